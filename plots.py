"""Pictures of a run: ROC curve, score histograms, anomaly maps, training curve; the per-class bar chart; and
anomaly maps beside ground-truth defect masks (pixel-level data such as MVTec AD).

matplotlib is optional: only `evaluate.py --plots` and `--table` drawing need it (pip install matplotlib).
Every figure's size is known in advance (FIGSIZE inches at DPI; `masks_figsize(n)` for the mask figure, whose
height grows with the number of images), so a test can check each PNG's size.

    python evaluate.py RUN --plots                  # roc.png, scores.png, maps-mismatch.png, training.png in RUN
    python evaluate.py RUN --plots --maps gradient  # and maps-gradient.png, the paper's gradient maps

Choices that hold for every figure: titles are wrapped to the figure's width between phrases (long teacher names
included); anomaly maps use one perceptually uniform colour map (dark = low, bright = high) with a labelled colour
bar; every bar chart's y-axis starts at 0 (a bar's length is its AUROC, in every chart alike), shows the 50% chance
line, and every bar carries its value.
"""
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import torch

from cli import NO_MATPLOTLIB
from data import ANOMALOUS, NORMAL
from writes import write_atomically

DPI = 100
FIGSIZE = {"roc": (5.5, 5.5), "scores": (6.5, 4.5), "training": (6.5, 4.5), "maps": (12, 7.6), "table": (11, 5.5)}
MAP_CMAP = "inferno"     # perceptually uniform: black (low) .. red .. yellow-white (high), readable in grey too
MASK_COLOR = "cyan"      # ground-truth outline: stands out on inferno's dark and bright ends and on photographs
MAP_LABELS = {  # what one pixel of each kind of map means (colour-bar label)
    "mismatch": "student-teacher mismatch at this pixel\n(the score's formula applied here; 0 = perfect imitation)",
    "gradient": "|d score / d pixel|, scaled per image, smoothed\n(high = the score is most sensitive to this pixel)",
}


class PlotError(ValueError):
    """Plots cannot be drawn (matplotlib missing); the message says how to install it."""


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError(NO_MATPLOTLIB) from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path):
    """A figure as a PNG, written whole or not at all (writes.write_atomically: WriteError on a full disk), then
    closed; the caller says what it wrote."""
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    finally:
        pyplot().close(fig)


def wrap(text: str, width_in: float, fontsize: float = 12) -> str:
    """Break text into lines that fit width_in inches at fontsize points, between phrases (after ',', ':' or ';')
    where the phrases fit a line: 'teacher dino-vitb16,' / 'normal class 3 (cat)', never 'normal' / 'class 3'.
    A phrase longer than a line breaks at spaces, then hyphens, then anywhere. A DejaVu Sans character averages
    about 0.6 em, so 0.65 em leaves a margin."""
    chars = max(10, int(width_in * 72 / (0.65 * fontsize)))
    lines = []
    for paragraph in text.splitlines():
        line = ""
        for phrase in re.split(r"(?<=[,:;]) ", paragraph):
            joined = f"{line} {phrase}" if line else phrase
            if len(joined) <= chars:
                line = joined
                continue
            if line:
                lines.append(line)
            *whole, line = textwrap.wrap(phrase, chars) or [""]  # a phrase longer than a line breaks inside
            lines += whole
        lines.append(line)
    return "\n".join(lines)


## --------------------------------------------------------------------------------------------------------
## A run.

def teacher_label(teacher: dict) -> str:
    """config.json's teacher as a short name (record.teacher_name's: the preset, the Hugging Face repository, the
    folder of a model.safetensors, else the file's name); a teacher that has seen CIFAR-10 labels says so."""
    name = teacher.get("short_name") or teacher.get("preset") or Path(str(teacher["name"]).split("?")[0]).stem
    return name + (" (saw CIFAR-10 labels)" if teacher.get("label_leak") else "")


def run_title(cfg: dict) -> str:
    """'vit student, teacher dino-vitb16, normal class 3 (cat)': what a run's figures are of."""
    s = cfg["settings"]
    what = (f"MVTec AD category {s['class_name']}" if s.get("dataset") == "mvtec" else
            f"normal class {s['cls']} ({s['class_name']})")
    return f"{s['backbone']} student, teacher {teacher_label(cfg['teacher'])}, {what}"


def roc_png(path, scores, labels, auc, title):
    """ROC curve of test scores (numpy (N,) float, higher = more anomalous) against labels (N,) in {0, 1}."""
    plt = pyplot()
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=FIGSIZE["roc"], layout="constrained")
    ax.plot(fpr, tpr, label=f"AUROC {auc:.4f}\n({(labels == NORMAL).sum()} normal, "
                            f"{(labels == ANOMALOUS).sum()} anomalous)")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUROC 0.5)")
    ax.set(xlabel="false positive rate (normal images flagged)", ylabel="true positive rate (anomalies caught)",
           xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.set_title(wrap(title, FIGSIZE["roc"][0]))
    ax.legend(loc="lower right")
    save(fig, path)


def scores_png(path, scores, labels, title):
    """Histograms of the test scores of normal and anomalous images, each normalised to area 1."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE["scores"], layout="constrained")
    fewest = min((labels == NORMAL).sum(), (labels == ANOMALOUS).sum())
    bins = np.histogram_bin_edges(scores, bins=int(np.clip(2 * np.sqrt(fewest), 10, 50)))  # few images: wider bins
    for kind, name in ((NORMAL, "normal"), (ANOMALOUS, "anomalous")):
        ax.hist(scores[labels == kind], bins=bins, alpha=0.6, density=True, label=f"{name} ({(labels == kind).sum()})")
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="density (area 1 per kind)")
    ax.set_title(wrap(title, FIGSIZE["scores"][0]))
    ax.legend()
    save(fig, path)


def training_png(path, log: list[dict], title):
    """Training loss and validation loss on normal images per epoch (log.jsonl rows). The legend goes below the
    axes and the points keep a margin from the axes' edges, so no point hides under it; with few epochs each
    point carries its value (one epoch is two points, not a curve)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=FIGSIZE["training"], layout="constrained")
    epochs = [r["epoch"] for r in log]
    for key, style, label in (("loss", "o-", "training loss"), ("val_normal_loss", "s-",
                                                                 "validation loss (normal images)")):
        values = [r[key] for r in log]
        ax.plot(epochs, values, style, label=label)
        if len(log) <= 3:
            for e, v in zip(epochs, values, strict=True):
                ax.annotate(f"{v:.4f}", (e, v), xytext=(7, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set(xlabel="epoch", ylabel="distillation loss")
    ax.set_title(wrap(title, FIGSIZE["training"][0]))
    # whole epochs only, and half an epoch of room each side: one epoch is a point at 1, not an axis 0.96 .. 1.04
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.margins(y=0.15)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    save(fig, path)


def picks(scores, labels, k):
    """Indices of the k most and k least anomalous test images of each kind (row title, indices)."""
    rows = []
    for kind, name in ((NORMAL, "normal"), (ANOMALOUS, "anomalous")):
        idx = np.flatnonzero(labels == kind)
        order = idx[np.argsort(scores[idx])]
        rows += [(f"{name},\nmost anomalous", order[::-1][:k]), (f"{name},\nleast anomalous", order[:k])]
    return rows


def map_scale(maps: np.ndarray) -> tuple[float, float]:
    """One colour scale for a whole figure (so maps compare): the 1st and 99th percentile, so a few extreme
    pixels do not wash out the rest."""
    lo, hi = np.percentile(maps, 1), np.percentile(maps, 99)
    return float(lo), float(hi if hi > lo else lo + 1e-12)


def compute_maps(kdad, x, amp, kind: str) -> np.ndarray:
    """(B, S, S) float numpy anomaly maps of a preprocessed batch: 'mismatch' or the paper's 'gradient'."""
    with amp():
        return kdad.map(x, kind).cpu().numpy()


def maps_png(path, kdad, images, prep, amp, scores, labels, kind="mismatch", k=4, title=""):
    """Test images beside their anomaly maps: 4 rows (normal / anomalous, most / least anomalous), k pairs each,
    one colour scale for all maps with a labelled colour bar."""
    plt = pyplot()
    rows = picks(scores, labels, k)
    chosen = np.concatenate([r[1] for r in rows])
    x = prep(images[torch.as_tensor(chosen, device=images.device)], prep.center(len(chosen)))
    maps = compute_maps(kdad, x, amp, kind)
    shown = (x.float() * prep.std + prep.mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # undo normalising
    lo, hi = map_scale(maps)
    fig = plt.figure(figsize=FIGSIZE["maps"], layout="constrained")
    # columns: image, map, gap, image, map, gap, ...: a narrow empty column keeps each pair together
    grid = fig.add_gridspec(len(rows), 3 * k - 1, width_ratios=([1, 1, 0.15] * k)[:-1])
    i, im, map_axes = 0, None, []
    for r, (row_title, idx) in enumerate(rows):
        for c in range(k):
            a, m = fig.add_subplot(grid[r, 3 * c]), fig.add_subplot(grid[r, 3 * c + 1])
            map_axes.append(m)
            for ax in (a, m):
                ax.set_axis_off()
            if c < len(idx):
                a.imshow(shown[i])
                im = m.imshow(maps[i], cmap=MAP_CMAP, vmin=lo, vmax=hi)
                a.set_title(f"score {scores[idx[c]]:.3f}", fontsize=9, loc="left")
                i += 1
            if c == 0:
                a.text(-0.08, 0.5, row_title, transform=a.transAxes, rotation=90, va="center", ha="right",
                       fontsize=10)
    fig.colorbar(im, ax=map_axes, shrink=0.6, extend="both", label=MAP_LABELS[kind])
    head = f"{kind} maps: test images beside their maps (one colour scale: dark = low, bright = high)"
    fig.suptitle(wrap(head + (f"\n{title}" if title else ""), FIGSIZE["maps"][0] - 1))
    save(fig, path)


def draw_run(run: Path, cfg, kdad, data, prep, amp, test_scores, test_auroc, maps="mismatch") -> list[Path]:
    """roc.png, scores.png, maps-<kind>.png (each kind of map has its own file) and training.png in the run
    folder; says what it wrote, in one line, and returns the paths."""
    title = run_title(cfg)
    scores, labels = test_scores.numpy(), data.test_labels.cpu().numpy()
    written = [run / "roc.png", run / "scores.png", run / f"maps-{maps}.png"]
    roc_png(written[0], scores, labels, test_auroc, f"test ROC: {title}")
    scores_png(written[1], scores, labels, f"test scores: {title}")
    if data.test_masks is not None:
        mvtec_maps_png(written[2], kdad, data, prep, amp, scores, maps, title=title)
    else:
        maps_png(written[2], kdad, data.test, prep, amp, scores, labels, maps, title=title)
    log_path = run / "log.jsonl"
    if log_path.is_file():
        written.append(run / "training.png")
        training_png(written[3], [json.loads(line) for line in log_path.read_text().splitlines()],
                     f"training: {title}")
    print(f"wrote {', '.join(p.name for p in written)} in {run}")
    return written


## --------------------------------------------------------------------------------------------------------
## Pixel-level ground truth: anomaly maps beside defect masks (MVTec AD style test sets).

def mvtec_maps_png(path, kdad, data, prep, amp, scores, kind="mismatch", defective=4, good=2, title=""):
    """maps-<kind>.png of an MVTec AD run: the `defective` highest-scoring defective test images and the `good` highest-
    scoring good ones (where a false alarm would show), each as image | map with the mask's outline | image with
    the outline (maps_with_masks_png), at the network's input size."""
    labels = data.test_labels.cpu().numpy()
    chosen = [i for kind_ in (ANOMALOUS, NORMAL) for i in np.flatnonzero(labels == kind_)[
        np.argsort(-scores[labels == kind_])][:defective if kind_ == ANOMALOUS else good]]
    x = prep(data.test[torch.as_tensor(chosen, device=data.test.device)], prep.center(len(chosen)))
    maps = compute_maps(kdad, x, amp, kind)
    shown = (x.float() * prep.std + prep.mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # undo normalising
    off = int(prep.center(1).top[0])
    masks = data.test_masks[chosen][:, off:off + prep.size, off:off + prep.size].numpy()
    names = ["/".join(Path(data.test_files[i]).parts[-2:]) for i in chosen]
    titles = [f"{name}, score {scores[i]:.3f}" for name, i in zip(names, chosen, strict=True)]
    maps_with_masks_png(path, shown, maps, masks, titles, f"{kind} maps against the defect masks\n{title}",
                        map_label=MAP_LABELS[kind])


MASK_PANEL_IN, MASK_WIDTH_IN, MASK_HEAD_IN = 2.6, 9.5, 1.7  # height per image row, width, title + colour bar


def masks_figsize(n: int) -> tuple[float, float]:
    """(width, height) in inches of maps_with_masks_png's figure for n images: one row of panels per image."""
    return MASK_WIDTH_IN, MASK_HEAD_IN + MASK_PANEL_IN * n


def maps_with_masks_png(path, images, maps, masks, titles, title, map_label="anomaly map (higher = more anomalous)"):
    """For each image, three panels side by side: the image; its anomaly map with the ground-truth outline
    (colour bar: `map_label`, which should name the value's meaning); the image with the outline.

    images (N, H, W, 3) float in [0, 1]; maps (N, H, W) float, any units (one colour scale for all, 1st..99th
    percentile); masks (N, H, W) bool, True = defect (an all-False mask is a defect-free image); titles: N strings
    (e.g. the file name and its defect type). Raises ValueError on shapes that do not match, PlotError without
    matplotlib. The outline is the 0.5 level contour of the mask, the boundary between its pixels and the rest.
    """
    images, maps, masks = np.asarray(images, dtype=np.float32), np.asarray(maps, dtype=np.float32), np.asarray(masks)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
    n = len(images)
    if maps.shape != images.shape[:3] or masks.shape != images.shape[:3]:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W) = {images.shape[:3]}")
    if masks.dtype != bool:
        raise ValueError(f"masks must be bool (True = defect), got {masks.dtype}")
    if len(titles) != n or n == 0:
        raise ValueError(f"need one title per image and at least one image: {len(titles)} titles, {n} images")
    if n and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"images must be floats in [0, 1], got {images.min():g} .. {images.max():g} "
                         f"(uint8 images: divide by 255)")
    if not np.isfinite(maps).all():
        raise ValueError("maps hold NaN or inf: a map must be finite everywhere to be drawn")
    plt = pyplot()
    lo, hi = map_scale(maps)
    fig, axes = plt.subplots(n, 3, figsize=masks_figsize(n), layout="constrained", squeeze=False)
    for i in range(n):
        image_ax, map_ax, mask_ax = axes[i]
        image_ax.imshow(images[i])
        im = map_ax.imshow(maps[i], cmap=MAP_CMAP, vmin=lo, vmax=hi)
        mask_ax.imshow(images[i])
        if masks[i].any():
            for ax in (map_ax, mask_ax):
                ax.contour(masks[i].astype(np.float32), levels=[0.5], colors=MASK_COLOR, linewidths=1.5)
        mask_ax.set_title("defect-free (empty mask)" if not masks[i].any()
                          else f"ground truth ({masks[i].mean():.1%} of pixels)", fontsize=9)
        image_ax.set_title(wrap(titles[i], MASK_WIDTH_IN / 3.5, 9), fontsize=9)
        map_ax.set_title(f"map (mean {maps[i].mean():#.3g})", fontsize=9)
        for ax in axes[i]:
            ax.set_axis_off()
    # under the map column, horizontal: the three columns keep their even spacing
    fig.colorbar(im, ax=axes[:, 1], location="bottom", extend="both", label=wrap(map_label, 4.5, 10))
    fig.suptitle(wrap(f"{title}\n{MASK_COLOR} line: ground-truth defect outline", MASK_WIDTH_IN))
    save(fig, path)


## --------------------------------------------------------------------------------------------------------
## The per-class bar chart: this project's test AUROC beside the teacher-alone kNN baseline and published numbers.

SERIES = (  # (row field, legend label, colour); a series is drawn only when some row has a value for it
    ("test_auroc", "this project: test AUROC", "C0"),
    ("knn_test_auroc", "teacher alone: kNN on its features", "0.55"),
    ("published", None, "C1"),  # label given by the caller: which paper
)


def class_label(row: dict, width: int = 16) -> str:
    """'3 cat'; a long class name goes on up to three lines, and only beyond that is it cut (with '...')."""
    lines = textwrap.wrap(f"{row['class']} {row['name']}".strip(), width, break_on_hyphens=True,
                          max_lines=3, placeholder="...")
    return "\n".join(lines)


def table_png(path, rows: list[dict], title: str, published_label: str = "published"):
    """Grouped bars per class, and the mean (row class 'mean') set apart at the right.

    rows: dicts with 'class', 'name', 'test_auroc' (%), 'std' (% or None: std over seeds, drawn as an error bar),
    'published' (% or None) and 'knn_test_auroc' (%, None or missing: the teacher-alone kNN baseline). A series
    with no value in any row is left out; a missing value inside a drawn series is marked 'n/a' (never a 0 bar).
    title names what was compared (backbone, teacher, data, --limit); published_label names the paper the published
    numbers come from. The figure has a fixed size for 1 to about 20 classes.
    """
    if not rows:
        raise ValueError("table_png needs at least one row")
    plt = pyplot()
    groups = [r for r in rows if r["class"] != "mean"] + [r for r in rows if r["class"] == "mean"]
    series = [(key, label or published_label, colour) for key, label, colour in SERIES
              if any(r.get(key) is not None for r in groups)]
    has_mean = groups[-1]["class"] == "mean"
    x = np.arange(len(groups), dtype=float)
    if has_mean:
        x[-1] += 0.5  # half a group of room before the mean
    width = 0.8 / len(series)
    pad = 0.6 + max(0, 6 - len(groups)) / 2  # few classes: narrower bars, centred, not stretched over the width
    # a value is written across its bar where it fits (about 10 inches of axes; 4 characters of 0.6 em at 9 pt),
    # else along it
    across = width * 10 / (x[-1] - x[0] + 2 * pad) >= 4 * 0.6 * 9 / 72
    value_style = dict(ha="center", va="bottom", fontsize=9 if across else 8, rotation=0 if across else 90)
    fig, ax = plt.subplots(figsize=FIGSIZE["table"], layout="constrained")
    handles = []
    for j, (key, label, colour) in enumerate(series):
        at = x + (j - (len(series) - 1) / 2) * width
        have = [i for i, r in enumerate(groups) if r.get(key) is not None]
        heights = np.array([groups[i][key] for i in have], dtype=float)
        handles.append(ax.bar(at[have], heights, width, color=colour,
                              label=wrap(label, FIGSIZE["table"][0] / 3.3, fontsize=9)))  # 3 legend columns
        for i in sorted(set(range(len(groups))) - set(have)):
            ax.text(at[i], 1, "n/a", **value_style | {"rotation": 90, "fontsize": 8, "color": "0.3"})
        stds = np.zeros(len(have))
        if key == "test_auroc":
            stds = np.array([groups[i].get("std") for i in have], dtype=float)  # None -> nan: no error bar there
            if not np.isnan(stds).all():
                spread = ~np.isnan(stds)
                handles.append(ax.errorbar(at[have][spread], heights[spread], yerr=stds[spread], fmt="none",
                                           ecolor="black", capsize=2, lw=1, label="± std over seeds"))
            stds = np.nan_to_num(stds)
        for a, h, e in zip(at[have], heights, stds, strict=True):  # each value, above its bar and error bar
            ax.text(a, h + e + 0.8, f"{h:.1f}", **value_style)
    handles.append(ax.axhline(50, color="crimson", ls="--", lw=1, label="chance (50%)"))
    if has_mean:
        ax.axvline(x[-1] - 0.75, color="0.6", lw=0.8)
    many = len(groups) > 8
    ax.set_xticks(x, [class_label(r) if r["class"] != "mean" else "mean" for r in groups],
                  rotation=40 if many else 0, ha="right" if many else "center", rotation_mode="anchor",
                  fontsize=8 if len(groups) > 12 else 9)
    ax.set_xlim(x[0] - pad, x[-1] + pad)
    ax.set_ylim(0, 108 if across else 116)  # from 0 in every chart; room above 100 for the values
    ax.set_yticks(np.arange(0, 100.1, 10))
    ax.set_ylabel("test AUROC (%)")
    fig.suptitle(wrap(title, FIGSIZE["table"][0]))
    # below the axes: a legend there covers no bar
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=9, frameon=False)
    save(fig, path)
