"""hubconf.py through torch.hub.load(source="local"): both entry points, local files only."""
import numpy as np
import pytest
import torch

from iqa.runtime import UserError
from iqa.scoring import load_scorer
from tests.helpers import ROOT
from tests.scoring_files import make_image, write_stage1_pkl, write_stage2_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub")
    write_stage2_checkpoint(folder / "best.pt")
    write_stage1_pkl(folder / "encoder.pkl")
    images = torch.stack([torch.from_numpy(np.array(make_image(256, 224, seed=k))).permute(2, 0, 1)
                          for k in range(2)]).float() / 255
    return folder / "best.pt", folder / "encoder.pkl", images


@pytest.mark.parametrize("entry, index", [("hyperiqa_swin", 0), ("qualiclip_swin_encoder", 1)])
def test_hub_load_gives_the_scorer_of_the_checkpoint(files, entry, index):
    path, images = files[index], files[2]
    scorer = torch.hub.load(ROOT, entry, checkpoint=str(path), source="local")
    assert scorer.kind == entry
    torch.testing.assert_close(scorer(images), load_scorer(path)(images), rtol=0, atol=1e-7)


def test_an_entry_point_refuses_the_other_kind(files):
    with pytest.raises(UserError, match="is a Stage-1 encoder .pkl"):
        torch.hub.load(ROOT, "hyperiqa_swin", checkpoint=str(files[1]), source="local")
    with pytest.raises(UserError, match="is a train_swin.py checkpoint"):
        torch.hub.load(ROOT, "qualiclip_swin_encoder", checkpoint=str(files[0]), source="local")
