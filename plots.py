"""Pictures of a run: ROC curve, score histograms, anomaly maps, training curve; and the per-class bar chart.

matplotlib is optional: only `evaluate.py --plots` and `--table` drawing need it (pip install matplotlib).
Every figure is a fixed size (FIGSIZE inches at DPI) so its PNG size is known.

    python evaluate.py RUN --plots                  # roc.png, scores.png, maps.png, training.png in RUN
    python evaluate.py RUN --plots --maps gradient  # the paper's gradient maps instead
"""
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve

from data import ANOMALOUS, NORMAL, center

DPI = 100
FIGSIZE = {"roc": (5, 5), "scores": (6, 4), "training": (6, 4), "maps": (12, 8.4), "table": (9, 4)}


class PlotError(ValueError):
    """Plots cannot be drawn (matplotlib missing); the message says how to install it."""


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plots needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path):
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    print(f"wrote {path}")


## --------------------------------------------------------------------------------------------------------
## A run.

def roc_png(path, scores, labels, auc, title):
    plt = pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=FIGSIZE["roc"], layout="constrained")
    ax.plot(fpr, tpr, label=f"AUROC {auc:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set(xlabel="false positive rate (normal flagged)", ylabel="true positive rate (anomalies caught)",
           title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    save(fig, path)


def scores_png(path, scores, labels, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE["scores"], layout="constrained")
    bins = np.histogram_bin_edges(scores, bins=50)
    for kind, name in ((NORMAL, "normal"), (ANOMALOUS, "anomalous")):
        ax.hist(scores[labels == kind], bins=bins, alpha=0.6, density=True, label=f"{name} ({(labels == kind).sum()})")
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="density", title=title)
    ax.legend()
    save(fig, path)


def training_png(path, log: list[dict], title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE["training"], layout="constrained")
    epochs = [r["epoch"] for r in log]
    ax.plot(epochs, [r["loss"] for r in log], "o-", label="training loss")
    ax.plot(epochs, [r["val_normal_loss"] for r in log], "s-", label="validation loss (normal images)")
    ax.set(xlabel="epoch", ylabel="distillation loss", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    save(fig, path)


def picks(scores, labels, k):
    """Indices of the k most and k least anomalous test images of each kind (row title, indices)."""
    rows = []
    for kind, name in ((NORMAL, "normal"), (ANOMALOUS, "anomalous")):
        idx = np.flatnonzero(labels == kind)
        order = idx[np.argsort(scores[idx])]
        rows += [(f"{name}, most anomalous", order[::-1][:k]), (f"{name}, least anomalous", order[:k])]
    return rows


def maps_png(path, kdad, images, prep, amp, scores, labels, kind="mismatch", k=6):
    """Test images with their anomaly maps overlaid: 4 rows (most / least anomalous, normal / anomalous)."""
    plt = pyplot()
    rows = picks(scores, labels, k)
    chosen = np.concatenate([r[1] for r in rows])
    x = prep(images[torch.as_tensor(chosen, device=images.device)], center(len(chosen), prep.size))
    with amp():
        if kind == "gradient":
            maps = kdad.gradient_map(x).float()
        else:
            with torch.inference_mode():
                maps = kdad.anomaly_map(x).float()
    shown = (x.float() * prep.std + prep.mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # undo normalising
    maps = maps.cpu().numpy()
    lo, hi = np.percentile(maps, 1), np.percentile(maps, 99)  # one colour scale for the whole grid
    fig, axes = plt.subplots(len(rows), k, figsize=FIGSIZE["maps"], layout="constrained", squeeze=False)
    i = 0
    for r, (title, idx) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(idx):
                ax.imshow(shown[i])
                ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
                ax.set_title(f"{scores[idx[c]]:.3f}", fontsize=8)
                i += 1
        axes[r, 0].text(-0.1, 0.5, title, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=9)
    fig.suptitle(f"{kind} maps (score above each image)")
    save(fig, path)


def draw_run(run: Path, cfg, kdad, data, prep, amp, test_scores, test_auroc, maps="mismatch"):
    s = cfg["settings"]
    title = f"{s['backbone']}, class {s['cls']} ({s['class_name']}), teacher {Path(cfg['teacher']['name']).name}"
    scores, labels = test_scores.numpy(), data.test_labels.cpu().numpy()
    roc_png(run / "roc.png", scores, labels, test_auroc, f"test ROC: {title}")
    scores_png(run / "scores.png", scores, labels, f"test scores: {title}")
    maps_png(run / "maps.png", kdad, data.test, prep, amp, scores, labels, maps)
    log_path = run / "log.jsonl"
    if log_path.is_file():
        training_png(run / "training.png", [json.loads(line) for line in log_path.read_text().splitlines()],
                     f"training: {title}")


## --------------------------------------------------------------------------------------------------------
## The per-class table against the published numbers.

def table_png(path, rows: list[dict], label: str):
    plt = pyplot()
    classes = [r for r in rows if r["class"] != "mean"]
    names = [f"{r['class']} {r['name']}" for r in classes]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=FIGSIZE["table"], layout="constrained")
    ours = [r["test_auroc"] for r in classes]
    errs = [r["std"] or 0 for r in classes]
    ax.bar(x - 0.2, ours, 0.4, yerr=errs, label="this run (test AUROC)")
    if any(r["published"] is not None for r in classes):
        ax.bar(x + 0.2, [r["published"] or 0 for r in classes], 0.4, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="AUROC (%)", ylim=(min(50, *ours) - 1, 100), title="one-class CIFAR-10, per class")
    ax.legend(loc="lower right")
    save(fig, path)
