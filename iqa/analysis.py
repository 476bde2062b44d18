"""The standard IQA analysis figures of trained checkpoints (``tools/analyze.py``).

Every checkpoint is loaded by ``iqa.scoring.load_scorer`` (any registered kind) and scores images
as evaluation does.  Each figure is a PNG and a JSON of the numbers drawn, under one stem:

* ``levels``: quality vs. degradation level.  Clean images are resized once (shorter side
  ``DEGRADE_RESIZE`` by default), degraded at levels 1..5 of each distortion type (level 0 = the clean
  image), and scored by every checkpoint; the curve is the mean over images with the sample
  standard deviation (ddof 1) as its band.  ``levels`` has the four synthetic types of
  ``qualiclip_pretrain.degradation_generator`` (``degrade_batch``), ``levels_arniqa`` ARNIQA's 24
  distortions in their 7 groups (``qualiclip_pretrain.arniqa.distort``).
* ``attention``: the stage-attention weights of attention-fusion Stage-2 checkpoints, per image
  the mean over the checkpoint's grid crops; their distribution per dataset and against MOS.
* ``feature_map``: a 2-D embedding (PCA, or t-SNE) of each checkpoint's encoder features
  (``encoder_features``: last Swin stage, average-pooled, mean over grid crops), one column per
  checkpoint: dataset images coloured by MOS; the degraded images of ``levels`` coloured by
  distortion type and by level.
* ``pred_vs_mos``: every checkpoint's scores against MOS on every dataset, SRCC/PLCC per panel.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from iqa import plots
from iqa.datasets import load_rgb, read_index, select_split
from iqa.metrics import all_metrics, srcc
from iqa.patches import DEFAULT_RESIZE, EvalPatchDataset, decode_threads, make_loader, to_model_input
from iqa.runtime import UserError, atomic_write_json, autocast
from iqa.scoring import load_scorer, resize_rgb
from models.swin_backbone import SwinBackbone
from qualiclip_pretrain import arniqa
from qualiclip_pretrain.degradation_generator import DISTORTION_TYPES, LEVEL_PARAMS, NUM_LEVELS, degrade_batch

plt = plots.plt
FIGURES = ("levels", "attention", "feature_map", "pred_vs_mos")
EMBEDDINGS = ("pca", "tsne")
DEGRADE_RESIZE = DEFAULT_RESIZE  # shorter side the clean images are degraded at (what Stage 2 sees)
MIN_DEGRADE_RESIZE = 48  # ARNIQA's noneccpatch needs images of at least 48 pixels a side
LEVELS = list(range(NUM_LEVELS + 1))  # 0 = clean
SPREAD = "sample standard deviation (ddof 1) over images"
STAGE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


@dataclass
class Checkpoint:
    label: str
    path: str
    scorer: object  # iqa.scoring.Scorer


@dataclass
class ImageSet:
    """The images of one dataset (``iqa.datasets.Sample``s, MOS on the dataset's native scale)."""
    name: str
    samples: list

    @property
    def mos(self):
        return np.array([s.mos for s in self.samples], dtype=np.float64)


# ----------------------------------------------------------------------------- inputs

def unique_labels(paths):
    """The shortest trailing path parts that tell ``paths`` apart (``runs/a/best.pt`` -> ``a/best.pt``)."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise UserError("--checkpoint names the same file twice; give each checkpoint once")


def load_checkpoints(paths, labels, device):
    if labels is not None and len(labels) != len(paths):
        raise UserError(f"--labels has {len(labels)} names for {len(paths)} checkpoints; give one per --checkpoint")
    labels = labels or unique_labels(paths)
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels {' '.join(labels)} repeats a name; give each checkpoint its own")
    return [Checkpoint(label, path, load_scorer(path, device)) for label, path in zip(labels, paths)]


def seeded_subset(items, count, seed):
    """``count`` of ``items`` drawn with ``seed``, in their original order (all of them when ``count`` is 0
    or at least their number)."""
    if not count or count >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), count, replace=False))
    return [items[i] for i in keep]


def dataset_sets(specs, split, max_images, seed):
    """{name: root} -> ``ImageSet``s of the ``split`` images (at most ``max_images``, seeded)."""
    sets = []
    for name, root in specs.items():
        samples = select_split(read_index(name, root), split, name)
        sets.append(ImageSet(name, seeded_subset(samples, max_images, seed)))
    return sets


def clean_images(paths, resize=DEGRADE_RESIZE):
    """Files -> uint8 3×H×W tensors with shorter side ``resize`` (PIL bicubic), to be degraded."""
    return [resize_rgb(load_rgb(p), resize, resize) for p in paths]


class DecodedImages:
    """Each image set decoded once per resize setting the checkpoints use."""

    def __init__(self):
        self.cache = {}

    def get(self, scorer, image_set):
        key = (image_set.name, str(scorer.resize), scorer.patch_size)
        if key not in self.cache:
            with ThreadPoolExecutor(decode_threads()) as pool:
                self.cache[key] = list(tqdm(pool.map(scorer.read, [s.path for s in image_set.samples]),
                                            total=len(image_set.samples), desc=f"decode {image_set.name}", leave=False))
        return self.cache[key]


# ----------------------------------------------------------------------------- per-image vectors

def crop_means(fn, images, opts, device, desc):
    """Mean over the grid crops ``opts`` describes of ``fn(crops)`` (N×D per batch) -> (len(images), D)
    float64 numpy; the vector counterpart of the scores ``iqa.evaluation.predict_images`` averages.
    A scorer of whole images (``opts.patch_size`` None) gives ``fn`` one whole image at a time."""
    if opts.patch_size is None:
        with torch.inference_mode(), autocast(device, opts.amp):
            return np.stack([fn(to_model_input(image.unsqueeze(0), device))[0].double().cpu().numpy()
                             for image in tqdm(images, desc=desc, leave=False)])
    loader = make_loader(EvalPatchDataset(images, opts.patch_num, opts.patch_size), opts.batch_size,
                         opts.num_workers, device)
    sums = None
    with torch.inference_mode():
        for patches, index in tqdm(loader, desc=desc, leave=False):
            with autocast(device, opts.amp):
                out = fn(to_model_input(patches, device)).double()
            if sums is None:
                sums = torch.zeros(len(images), out.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, index.to(device), out)
    return (sums / opts.patch_num).cpu().numpy()


def encoder_features(checkpoint):
    """The per-crop feature function of a checkpoint's encoder: its Swin backbone's last stage,
    average-pooled; without one, the image embedding of a zero-shot model's ``encoder`` (a CLIP tower)."""
    model = checkpoint.scorer.model
    backbone = next((m for m in model.modules() if isinstance(m, SwinBackbone)), None)
    if backbone is not None:
        return lambda x: backbone(x)[-1].mean(dim=(2, 3))
    if isinstance(getattr(model, "encoder", None), torch.nn.Module):
        return model.encoder
    raise UserError(f"'{checkpoint.path}' ({checkpoint.scorer.kind}) has no encoder whose features could be "
                    f"mapped; leave it out or leave feature_map out of --figures")


def has_stage_attention(checkpoint):
    return getattr(checkpoint.scorer.model, "stage_attention", None) is not None


# ----------------------------------------------------------------------------- degradations

def four_type_ladder(image, name, generator):
    """One clean uint8 image -> (6, 3, H, W) uint8: clean, then levels 1..5 of synthetic type ``name``."""
    batch = image.unsqueeze(0).expand(NUM_LEVELS, -1, -1, -1)
    degraded = degrade_batch(batch, [name] * NUM_LEVELS, list(range(NUM_LEVELS)), generator, jpeg="torchvision",
                             noise_group_size=NUM_LEVELS)
    return torch.cat([image.unsqueeze(0), degraded.to(torch.uint8)])


def arniqa_ladder(image, name, generator):
    """The same ladder for ARNIQA distortion ``name`` (its levels 1..5), quantised to 8 bits."""
    batch = image.unsqueeze(0).expand(NUM_LEVELS, -1, -1, -1).float() / 255
    degraded = arniqa.distort(batch, name, torch.arange(1, NUM_LEVELS + 1), generator)
    return torch.cat([image.unsqueeze(0), (degraded * 255).round().to(torch.uint8)])


@dataclass(frozen=True)
class DistortionFamily:
    stem: str          # file stem of its figure
    names: tuple       # distortions, in panel order
    groups: dict       # panel row title -> names in that row
    params: dict       # name -> level parameters, mildest first
    ladder: object     # (image, name, generator) -> (6, 3, H, W) uint8


FOUR_TYPES = DistortionFamily("levels", DISTORTION_TYPES, {"synthetic": DISTORTION_TYPES}, LEVEL_PARAMS,
                              four_type_ladder)
ARNIQA = DistortionFamily("levels_arniqa", arniqa.DISTORTIONS, arniqa.DISTORTION_GROUPS, arniqa.LEVEL_PARAMS,
                          arniqa_ladder)


def run_ladders(checkpoints, images, family, opts_of, seed, features_of=None):
    """Score every checkpoint on every distortion ladder of ``family``, one distortion at a time.

    -> ``{label: {name: (n_images, 6) scores}}`` and, for checkpoints in ``features_of`` (label ->
    feature function), ``{label: {name: (n_images, 6, D) features}}``."""
    generator = torch.Generator().manual_seed(seed)
    scores = {c.label: {} for c in checkpoints}
    features = {label: {} for label in features_of or {}}
    for name in family.names:
        ladders = [family.ladder(image, name, generator)
                   for image in tqdm(images, desc=f"degrade {name}", leave=False)]
        flat = [level for ladder in ladders for level in ladder]
        for checkpoint in checkpoints:
            scorer = checkpoint.scorer
            prepared = [scorer.prepare(image) for image in flat]
            opts = opts_of(scorer)
            shape = (len(images), len(LEVELS))
            scores[checkpoint.label][name] = scorer.score_images(prepared, opts, progress=True).numpy().reshape(shape)
            if checkpoint.label in features:
                vectors = crop_means(features_of[checkpoint.label], prepared, opts, scorer.device, f"features {name}")
                features[checkpoint.label][name] = vectors.reshape(*shape, -1)
    return scores, features


def level_curve_data(family, scores, image_paths, degrade_resize, score_meanings):
    """The JSON of a level figure: per checkpoint and distortion the scores, their mean and spread per
    level, and ``level_srcc``: SRCC of score against minus the level over all (image, level) pairs
    (positive when the score falls as the distortion grows). ``score_meanings``: label -> the
    checkpoint's ``Scorer.score_meaning``, kept as ``score_meanings``.

    When the checkpoints' scores mean different things (a Stage-2 score in [0, 1] beside a Stage-1
    encoder's unbounded log-odds), one axis would flatten all but one of them: the figure then draws
    every checkpoint standardised by the mean and sample std of all its scores in this figure
    (``standardised``: label -> ``{"mean", "std"}``); the numbers above stay the raw scores."""
    checkpoints = {}
    for label, per_name in scores.items():
        checkpoints[label] = {}
        for name, values in per_name.items():
            levels = np.broadcast_to(np.array(LEVELS, dtype=np.float64), values.shape)
            checkpoints[label][name] = {
                "mean": values.mean(axis=0).tolist(), "std": values.std(axis=0, ddof=1).tolist(),
                "level_srcc": srcc(values.ravel(), -levels.ravel()), "scores": values.tolist(),
            }
    meanings = {label: score_meanings[label] for label in scores}
    standardised = None
    if len(set(meanings.values())) > 1:
        standardised = {}
        for label, per_name in scores.items():
            every = np.concatenate([values.ravel() for values in per_name.values()])
            standardised[label] = {"mean": float(every.mean()), "std": float(every.std(ddof=1))}
    return {"levels": LEVELS, "spread": SPREAD, "degrade_resize": degrade_resize, "images": list(image_paths),
            "groups": family.groups, "params": {n: family.params[n] for n in family.names},
            "score_meanings": meanings, "standardised": standardised, "checkpoints": checkpoints}


def drawn_curves(data):
    """(label -> name -> (mean, std) per level as drawn, y-axis label): the raw curves, or each
    checkpoint's standardised ones (``level_curve_data``) when ``data['standardised']`` is set."""
    drawn = {}
    for label, per_name in data["checkpoints"].items():
        scale = (data["standardised"] or {}).get(label)
        centre, unit = (scale["mean"], scale["std"] or 1.0) if scale else (0.0, 1.0)
        drawn[label] = {name: ((np.asarray(curve["mean"]) - centre) / unit, np.asarray(curve["std"]) / unit)
                        for name, curve in per_name.items()}
    ylabel = "standardised score (mean ± std)" if data["standardised"] else "score (mean ± std)"
    return drawn, ylabel


# ----------------------------------------------------------------------------- figures

def write_figure(fig, data, out_dir, stem):
    """``<stem>.png`` and ``<stem>.json`` in ``out_dir`` -> the PNG's file name."""
    atomic_write_json(os.path.join(out_dir, f"{stem}.json"), data)
    plots.save_figure(fig, os.path.join(out_dir, f"{stem}.png"))
    return f"{stem}.png"


def plot_level_curves(data, out_dir, stem):
    rows = list(data["groups"].items())
    cols = max(len(names) for _, names in rows)
    # Constrained layout keeps the suptitle clear of the top row's panel titles.
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 2.8 * len(rows)), squeeze=False,
                             layout="constrained")
    drawn, ylabel = drawn_curves(data)
    for r, (group, names) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(names):
                ax.axis("off")
                continue
            for label, per_name in drawn.items():
                mean, std = per_name[names[c]]
                line, = ax.plot(LEVELS, mean, marker="o", label=label)
                ax.fill_between(LEVELS, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set_title(names[c] if len(rows) == 1 else f"{group}: {names[c]}", fontsize=9)
            ax.set_xticks(LEVELS)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel(ylabel)
            if r == len(rows) - 1 or c >= len(rows[r + 1][1]):
                ax.set_xlabel("level (0 = clean)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Quality vs. degradation level ({len(data['images'])} images)")
    return write_figure(fig, data, out_dir, stem)


def per_checkpoint_and_set(checkpoints, image_sets, record):
    """{label: {dataset: record(scorer, image_set)}}, the images' paths and MOS in front of every record."""
    return {checkpoint.label: {image_set.name: {"images": [s.path for s in image_set.samples],
                                                "mos": image_set.mos.tolist(),
                                                **record(checkpoint.scorer, image_set)}
                               for image_set in image_sets}
            for checkpoint in checkpoints}


def attention_data(checkpoints, image_sets, decoded, opts_of):
    """{label: {dataset: {images, mos, weights (n, 4), mean, srcc_vs_mos}}} of the attention checkpoints."""
    def record(scorer, image_set):
        weights = crop_means(scorer.model.stage_weights, decoded.get(scorer, image_set), opts_of(scorer),
                             scorer.device, f"attention {image_set.name}")
        return {"weights": weights.tolist(), "mean": weights.mean(axis=0).tolist(),
                "srcc_vs_mos": [srcc(w, image_set.mos) for w in weights.T]}

    return per_checkpoint_and_set(checkpoints, image_sets, record)


def plot_attention(data, out_dir):
    labels = list(data)
    names = list(data[labels[0]])
    fig, axes = plt.subplots(len(labels), 1 + len(names), figsize=(3.6 * (1 + len(names)), 3.2 * len(labels)),
                             squeeze=False)
    for r, label in enumerate(labels):
        box = axes[r][0]
        for d, name in enumerate(names):
            weights = np.asarray(data[label][name]["weights"])
            parts = box.boxplot(list(weights.T), positions=[d * 5 + s for s in range(weights.shape[1])],
                                widths=0.8, patch_artist=True, showfliers=False)
            for patch, colour in zip(parts["boxes"], STAGE_COLOURS):
                patch.set_facecolor(colour)
        box.set_xticks([d * 5 + 1.5 for d in range(len(names))], names, fontsize=8)
        box.set(title=f"{label}\nweights per dataset", ylabel="stage weight")
        for c, name in enumerate(names, start=1):
            entry, ax = data[label][name], axes[r][c]
            weights = np.asarray(entry["weights"])
            for s in range(weights.shape[1]):
                ax.scatter(entry["mos"], weights[:, s], s=8, color=STAGE_COLOURS[s],
                           label=f"stage {s + 1} (SRCC {entry['srcc_vs_mos'][s]:+.2f})")
            ax.set(title=f"{label}: {name}", xlabel="MOS", ylabel="stage weight")
            ax.legend(fontsize=7)
        for ax in axes[r]:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_figure(fig, {"stages": 4, "checkpoints": data}, out_dir, "attention")


def embed(features, method, seed):
    """(n, D) features -> ((n, 2) points, the PCA's explained variance ratio or None), as lists."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if len(features) < 3:
        raise UserError(f"a feature map needs at least 3 images, got {len(features)}; raise --max_images or "
                        f"--num_images")
    if method == "pca":
        pca = PCA(n_components=2, svd_solver="full", random_state=seed)
        return pca.fit_transform(features).tolist(), pca.explained_variance_ratio_.tolist()
    perplexity = min(30.0, (len(features) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # One thread: beside torch's OpenMP runtime, scikit-learn's threaded t-SNE took 18-57 s for 12
    # points on 2 busy cores, against 0.1 s on one thread.
    with threadpool_limits(1):
        return tsne.fit_transform(features).tolist(), None


def mos_colour_values(image_sets):
    """MOS per image for colouring: as is for one dataset, else scaled to [0, 1] within each dataset."""
    if len(image_sets) == 1:
        return image_sets[0].mos, "MOS"
    scaled = [(s.mos - s.mos.min()) / max(np.ptp(s.mos), 1e-12) for s in image_sets]
    return np.concatenate(scaled), "MOS (scaled to [0, 1] within each dataset)"


def feature_map_data(checkpoints, image_sets, decoded, opts_of, synthetic, method, seed):
    """{"datasets": {label: ...}, "synthetic": {label: ...}} of the feature map.

    ``synthetic``: {label: {type: (n_images, 6, D) features}} from ``run_ladders`` (or None); its
    points are each clean image once and levels 1..5 of every type."""
    data = {"method": method, "seed": seed, "datasets": {}, "synthetic": {}}
    for checkpoint in checkpoints:
        scorer, fn = checkpoint.scorer, encoder_features(checkpoint)
        if image_sets:
            features = np.concatenate([crop_means(fn, decoded.get(scorer, s), opts_of(scorer), scorer.device,
                                                  f"features {s.name}") for s in image_sets])
            points, ratio = embed(features, method, seed)
            data["datasets"][checkpoint.label] = {
                "points": points, "explained_variance_ratio": ratio,
                "dataset": [s.name for s in image_sets for _ in s.samples],
                "images": [x.path for s in image_sets for x in s.samples],
                "mos": np.concatenate([s.mos for s in image_sets]).tolist(),
            }
        if synthetic:
            per_type = synthetic[checkpoint.label]
            first = per_type[DISTORTION_TYPES[0]]
            rows = [(first[:, 0], "clean", 0)] + [(per_type[t][:, k], t, k) for t in DISTORTION_TYPES
                                                  for k in LEVELS[1:]]
            points, ratio = embed(np.concatenate([r[0] for r in rows]), method, seed)
            data["synthetic"][checkpoint.label] = {
                "points": points, "explained_variance_ratio": ratio,
                "type": [t for f, t, _ in rows for _ in f], "level": [k for f, _, k in rows for _ in f],
            }
    return data


def plot_feature_map(data, image_sets, out_dir):
    labels = list(data["datasets"] or data["synthetic"])
    rows = (["MOS"] if data["datasets"] else []) + (["type", "level"] if data["synthetic"] else [])
    fig, axes = plt.subplots(len(rows), len(labels), figsize=(4.2 * len(labels), 3.8 * len(rows)), squeeze=False)
    for c, label in enumerate(labels):
        for r, row in enumerate(rows):
            ax = axes[r][c]
            if row == "MOS":
                entry = data["datasets"][label]
                points, (values, what) = np.asarray(entry["points"]), mos_colour_values(image_sets)
                markers = dict(zip([s.name for s in image_sets], "osD^v<>"))
                for name, marker in markers.items():
                    mask = np.array([d == name for d in entry["dataset"]])
                    art = ax.scatter(*points[mask].T, c=values[mask], cmap="viridis", marker=marker, s=14,
                                     vmin=values.min(), vmax=values.max(), label=name)
                fig.colorbar(art, ax=ax, label=what)
                if len(markers) > 1:
                    ax.legend(fontsize=7)
            else:
                entry = data["synthetic"][label]
                points = np.asarray(entry["points"])
                if row == "type":
                    for name, colour in zip((*DISTORTION_TYPES, "clean"), (*STAGE_COLOURS, "black")):
                        mask = np.array([t == name for t in entry["type"]])
                        ax.scatter(*points[mask].T, s=24 if name == "clean" else 10, color=colour, label=name,
                                   marker="x" if name == "clean" else "o")
                    ax.legend(fontsize=7)
                else:
                    art = ax.scatter(*points.T, c=entry["level"], cmap="magma_r", s=10)
                    fig.colorbar(art, ax=ax, label="level (0 = clean)")
            ratio = entry["explained_variance_ratio"]
            axis = "PC" if data["method"] == "pca" else "t-SNE "
            ax.set(title=f"{label}\ncoloured by {row}", xlabel=f"{axis}1", ylabel=f"{axis}2")
            if ratio is not None:
                ax.set(xlabel=f"PC1 ({ratio[0]:.0%})", ylabel=f"PC2 ({ratio[1]:.0%})")
    fig.tight_layout()
    return write_figure(fig, data, out_dir, "feature_map")


def pred_vs_mos_data(checkpoints, image_sets, decoded, opts_of):
    """{label: {dataset: {images, mos, score, metrics}}}: each checkpoint's own scores (``iqa.metrics``)."""
    def record(scorer, image_set):
        scores = scorer.score_images(decoded.get(scorer, image_set), opts_of(scorer), progress=True).numpy()
        return {"score": scores.tolist(), "metrics": all_metrics(scores, image_set.mos)}

    return per_checkpoint_and_set(checkpoints, image_sets, record)


def plot_pred_vs_mos(data, out_dir):
    labels = list(data)
    names = list(data[labels[0]])
    fig, axes = plt.subplots(len(labels), len(names), figsize=(3.6 * len(names), 3.4 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        for c, name in enumerate(names):
            entry, ax = data[label][name], axes[r][c]
            ax.scatter(entry["mos"], entry["score"], s=8, alpha=0.6)
            metrics = entry["metrics"]
            ax.set_title(f"{label} on {name}\nSRCC {metrics['srcc']:.3f}  PLCC {metrics['plcc']:.3f}  "
                         f"n={metrics['n']}", fontsize=9)
            ax.set(xlabel="MOS", ylabel="score")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_figure(fig, data, out_dir, "pred_vs_mos")


# ----------------------------------------------------------------------------- report

def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def report_text(checkpoints, image_sets, settings, sections):
    """``report.md``: inputs, then per figure its PNG and the numbers it shows."""
    lines = ["# Analysis", "", *(f"- {key}: {value}" for key, value in settings.items()), "",
             *_table(["label", "checkpoint", "kind"], [(c.label, c.path, c.scorer.kind) for c in checkpoints]), ""]
    if image_sets:
        lines += _table(["dataset", "images"], [(s.name, len(s.samples)) for s in image_sets]) + [""]
    for title, png, text in sections:
        lines += [f"## {title}", ""] + ([f"![{title}]({png})", ""] if png else []) + text + [""]
    return "\n".join(lines)


def level_section(data):
    rows = [(label, name, *(f"{m:.3f}" for m in curve["mean"]), f"{curve['level_srcc']:+.3f}")
            for label, per_name in data["checkpoints"].items() for name, curve in per_name.items()]
    return [f"Mean score per level over {len(data['images'])} images (band: {SPREAD}); level SRCC: SRCC of "
            f"score against minus the level (positive: the score falls as the distortion grows).", "",
            *_table(["checkpoint", "distortion", *map(str, LEVELS), "level SRCC"], rows), "",
            *standardised_note(data),
            "Parameters of levels 1..5:", *(f"- {name}: {', '.join(map(str, params))}"
                                            for name, params in data["params"].items())]


def standardised_note(data):
    """Report lines saying what each checkpoint's scores are and, when the figure standardises them, how."""
    if not data["standardised"]:
        return []
    return ["The checkpoints' scores mean different things, so the figure draws each one as (score − m) / s, "
            "m and s the mean and sample std (ddof 1) of all its scores in the figure; the table above is raw:",
            *(f"- {label}: {meaning} (m = {data['standardised'][label]['mean']:.4g}, "
              f"s = {data['standardised'][label]['std']:.4g})" for label, meaning in data["score_meanings"].items()),
            ""]


def attention_section(data, skipped):
    rows = [(label, name, *(f"{w:.3f}" for w in entry["mean"]), *(f"{s:+.2f}" for s in entry["srcc_vs_mos"]))
            for label, per_set in data.items() for name, entry in per_set.items()]
    text = ["Mean stage weight and SRCC of each stage's weight against MOS.", "",
            *_table(["checkpoint", "dataset", *(f"w{s}" for s in range(1, 5)), *(f"SRCC w{s}" for s in range(1, 5))],
                    rows)]
    return text + (["", f"No stage attention (left out): {', '.join(skipped)}."] if skipped else [])


def feature_section(data):
    text = [f"Embedding: {data['method']} (seed {data['seed']}) of average-pooled last-stage encoder features."]
    for part, entries in (("datasets", data["datasets"]), ("synthetic", data["synthetic"])):
        for label, entry in entries.items():
            ratio = entry["explained_variance_ratio"]
            explained = f", explained variance {ratio[0]:.1%} + {ratio[1]:.1%}" if ratio is not None else ""
            text.append(f"- {label}, {part}: {len(entry['points'])} points{explained}")
    return text


def pred_section(data):
    rows = [(label, name, f"{e['metrics']['srcc']:.4f}", f"{e['metrics']['plcc']:.4f}", e["metrics"]["n"])
            for label, per_set in data.items() for name, e in per_set.items()]
    return ["Each checkpoint's own scores (no mapping) against MOS.", "",
            *_table(["checkpoint", "dataset", "SRCC", "PLCC", "n"], rows)]
