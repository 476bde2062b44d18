"""``iqa.distributed.check_on_main``: rank 0 decides, every rank raises rank 0's error (two gloo processes)."""
import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from iqa.distributed import DistInfo, check_on_main
from iqa.runtime import UserError, check_output_dir


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_process(rank, port, failing_rank, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []

    def check():
        calls.append(rank)
        if rank == failing_rank:
            raise UserError(f"rank {rank} found a problem")

    try:
        check_on_main(check, DistInfo(rank=rank, world_size=2))
        outcome = "ok"
    except UserError as err:
        outcome = f"error: {err}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{outcome}\ncalls {calls}\n")


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank, expected", [
    (0, ["error: rank 0 found a problem", "error: rank 0 found a problem"]),
    (1, ["ok", "ok"]),  # what another rank would see is not asked: rank 0's view decides
])
def test_every_rank_raises_what_rank_0_found(tmp_path, failing_rank, expected):
    mp.start_processes(rank_process, args=(free_port(), failing_rank, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    lines = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert [line[0] for line in lines] == expected
    assert [line[1] for line in lines] == ["calls [0]", "calls []"]


def test_single_process_runs_the_check_itself(tmp_path):
    (tmp_path / "args.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run"):
        check_on_main(lambda: check_output_dir(tmp_path), DistInfo())
    check_on_main(lambda: check_output_dir(tmp_path / "new"), DistInfo())
    assert not (tmp_path / "new").exists()
