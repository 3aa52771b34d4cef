"""Score images, compute ROC AUC, re-evaluate a saved run, and tabulate runs.

Score convention, used everywhere: a higher anomaly score means "more anomalous", and ROC AUC treats the
anomalous images (label 1) as the positive class. The AUROC is the probability that a randomly drawn anomalous
image scores higher than a randomly drawn normal one: 0.5 is chance, 1.0 a perfect ranking.

    python evaluate.py runs/vit-vit-b16-cifar10-cat-s0             # recompute val/test AUROC from the saved student
    python evaluate.py runs/vit-vit-b16-cifar10-all-s0             # every class run of a --cls all folder
    python evaluate.py runs/vit-... --plots                        # and draw the figures (needs matplotlib)
    python evaluate.py runs/vgg-... --plots --maps gradient        # with the paper's gradient maps
    python evaluate.py --table runs/vit-*-all-s0 runs/vit-*-all-s1 # per-class table (mean +- std over seeds)

train.py uses `score_images` and `auroc` from here, so training-time and after-the-fact numbers come from the
same code.
"""
import sys

import cli

if __name__ == "__main__":  # flags first: --help and a mistyped flag answer before torch's 5-second import
    cli.evaluate_args(sys.argv[1:])
    cli.quiet_interrupt()

import csv  # the rest waits for the flag check above
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from checkpoint import CheckpointError, check_finite, check_state_dict, read_tensors, sha256
from cli import RunError, autocast, pick_device, progress
from data import (CIFAR10_CLASSES, CROP_PCT, MVTEC_CATEGORIES, DataError, Preprocess, batches, one_class_data,
                  open_source)
from distill import KDAD, channels_last, load_teacher, make_student, place, taps_for
from plots import PlotError, draw_run, pyplot, table_png
from record import TORCHVISION_CIFAR10, read_json, run_folders

# Published per-class figures (%): {(dataset, backbone): (source, {class: image AUROC}, {class: pixel AUROC})}.
# One-class CIFAR-10: the paper's table (VGG16) and the ViT reproduction's README
# (LucStrater/Knowledge_Distillation_AD).
# MVTec AD: the paper's detection and localisation AUROC per category, as the PaddlePaddle reproduction's README
# quotes them (txyugood/Knowledge_Distillation_AD_Paddle, "Origin" row): the paper's own table was not at hand to
# check them against. Its localisation is gradient maps at 128 px, scored on the defective test images only.
PUBLISHED = {
    ("cifar10", "vgg"): ("Salehi et al. 2021, KDAD paper (VGG16)", dict(zip(CIFAR10_CLASSES, [
        90.53, 90.35, 79.66, 77.02, 86.71, 91.40, 88.98, 86.78, 91.45, 88.91])), {}),
    ("cifar10", "vit"): ("ViT reproduction of KDAD (teacher vit-b16-cifar10, saw CIFAR-10 labels; epoch picked on the "
                         "test set)", dict(zip(CIFAR10_CLASSES, [
                             96.78, 98.16, 96.20, 93.55, 96.52, 94.72, 97.96, 97.71, 98.01, 98.68])), {}),
    ("mvtec", "vgg"): ("Salehi et al. 2021, KDAD paper (VGG16), as quoted by the PaddlePaddle reproduction's README; "
                       "pixel AUROC there is on defective images only", dict(zip(MVTEC_CATEGORIES, [
                           99.39, 89.19, 80.46, 79.25, 78.01, 98.37, 95.05, 73.58, 82.70, 83.31, 91.57, 92.17, 85.55,
                           94.29, 93.24])), dict(zip(MVTEC_CATEGORIES, [
                               96.32, 82.40, 95.86, 95.64, 91.78, 94.62, 98.05, 86.38, 89.63, 95.96, 82.77, 96.12,
                               76.45, 84.80, 93.90]))),
}
MEANS = ("test_auroc", "val_auroc", "knn_test_auroc", "pixel_auroc", "pro", "pixel_auroc_mismatch", "pro_mismatch")
COLUMNS = [("test_auroc", "test AUROC (%)"), ("knn_test_auroc", "teacher kNN alone (%)"),
           ("val_auroc", "val AUROC (%)"), ("pixel_auroc", "pixel AUROC (%)"), ("pro", "PRO (%)"),
           ("pixel_auroc_mismatch", "pixel AUROC, mismatch (%)"), ("pro_mismatch", "PRO, mismatch (%)"),
           ("runs", "runs"), ("published", "published (%)"), ("published_pixel", "published pixel AUROC (%)")]


## --------------------------------------------------------------------------------------------------------
## Scoring and AUROC.

def over_images(fn, images, prep: Preprocess, amp, batch_size: int, desc: str, plain=False) -> list:
    """fn(x) for each preprocessed, center-cropped batch x of uint8 images (N, 3, h, w), in order, under the
    precision's autocast, with a progress bar; returns the results as a list, one per batch."""
    out = []
    n = (len(images) + batch_size - 1) // batch_size
    with progress(batches(images, torch.arange(len(images)), prep.center(len(images)), batch_size, prep, plain), n,
                  desc) as bar:
        for _, x in bar:
            with amp():
                out.append(fn(x))
    return out


@torch.inference_mode()
def score_images(kdad: KDAD, images, prep: Preprocess, amp, batch_size=256, train_taps=False, plain=False,
                 embed=False):
    """Per-image anomaly scores (N,) float32 on the CPU of uint8 images (N, 3, h, w), center-cropped, teacher and
    student in one pass per batch. embed=True returns (scores, embeddings): the teacher's global image features
    (N, D) float32 from the same passes (distill.image_embedding), for the kNN baseline."""
    kdad.student.eval()
    parts = over_images(lambda x: [t.float().cpu() for t in kdad.score_and_embedding(x, train_taps)], images, prep,
                        amp, batch_size, "scoring", plain)
    scores = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0)
    return (scores, torch.cat([p[1] for p in parts])) if embed else scores


@torch.inference_mode()
def teacher_embeddings(kdad: KDAD, images, prep: Preprocess, amp, batch_size=256, plain=False) -> torch.Tensor:
    """(N, D) float32 CPU teacher image features of uint8 images, center-cropped: a teacher-only pass."""
    return torch.cat(over_images(lambda x: kdad.teacher_pass(x, ())[1].float().cpu(), images, prep, amp, batch_size,
                                 "teacher features", plain))


def knn_aurocs(bank: torch.Tensor, val_embedding: torch.Tensor, test_embedding: torch.Tensor, data, k: int) -> dict:
    """The teacher-alone baseline's validation and test AUROC (None where a split holds one kind only)."""
    return {"knn_val_auroc": auroc(knn_scores(bank, val_embedding, k), data.val_labels.cpu()),
            "knn_test_auroc": auroc(knn_scores(bank, test_embedding, k), data.test_labels.cpu())}


def knn_scores(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Anomaly score of each query (M,) float32: its mean cosine distance (1 - cos, in [0, 2]) to its k nearest
    neighbours among the bank (N, D) of normal training features; queries (M, D). The k-nearest-neighbour score
    of DN2 (Bergman et al. 2020), with the cosine distance used by PANDA's successors (Reiss & Hoshen 2021,
    arXiv 2106.03844). Raises ValueError unless 1 <= k <= N."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k = {k} nearest neighbours need at least {k} training images; there are {len(bank)}")
    bank = F.normalize(bank.float(), dim=1)
    out = []
    for q in F.normalize(queries.float(), dim=1).split(chunk):  # (chunk, N) similarities at a time
        nearest = (q @ bank.T).topk(k, dim=1).values                # (chunk, k) largest cosine similarities
        out.append((1 - nearest).mean(dim=1))
    return torch.cat(out) if out else torch.zeros(0)


def auroc(scores, labels) -> float | None:
    """ROC AUC in [0, 1] with anomalous (1) as the positive class and higher score = more anomalous
    (scikit-learn's roc_auc_score); None when the labels hold one kind only (no AUROC exists)."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, np.asarray(scores)))


## --------------------------------------------------------------------------------------------------------
## Localisation (MVTec AD): anomaly maps against the defect masks. Maps and masks are compared at the network's input
## resolution (the crop, S x S pixels): the masks are brought there by the images' own geometry (data.mvtec_masks).

PRO_FPR_LIMIT = 0.3  # the MVTec AD authors' integration limit


def anomaly_maps(kdad: KDAD, images, prep: Preprocess, amp, kind: str, batch_size=32) -> torch.Tensor:
    """(N, S, S) float32 CPU anomaly maps of uint8 images (N, 3, h, w), center-cropped, of kind 'mismatch' or
    'gradient' (KDAD.map); the gradient needs a backward pass per batch, hence the small default batch."""
    kdad.student.eval()
    return torch.cat(over_images(lambda x: kdad.map(x, kind).cpu(), images, prep, amp, batch_size, f"{kind} maps"))


def pixel_auroc(maps, masks) -> float | None:
    """ROC AUC in [0, 1] of every pixel's map value against its mask (scikit-learn's roc_auc_score), pooled over all
    test images (the good ones' pixels are all normal), as the MVTec AD authors' evaluation pools them. maps (N, S, S)
    float, masks (N, S, S) bool, same resolution. None when no pixel is defective."""
    return auroc(np.asarray(maps, dtype=np.float64).ravel(), np.asarray(masks).ravel().astype(np.int64))


def pro_score(maps, masks, fpr_limit: float = PRO_FPR_LIMIT) -> float | None:
    """Normalised area under the per-region-overlap (PRO) curve up to a false-positive rate of `fpr_limit`, in
    [0, 1], as the MVTec AD authors define and compute it (Bergmann et al., IJCV 2021; their evaluation code,
    pro_curve_util.compute_pro and generic_util.trapezoid):
    - a defect region is a connected component of a mask, 8-connected (scipy.ndimage.label with a 3x3 structure);
    - at a threshold t, the overlap of a region is the share of its pixels scoring >= t; PRO(t) is the mean over all
      regions of all images, each region counting the same whatever its size;
    - FPR(t) is the share of all defect-free pixels (of every test image, good ones included) scoring >= t;
    - every distinct score is a threshold; the curve runs from (0, 0) to (1, 1); the area up to fpr_limit is taken
      with the trapezoid rule (scikit-learn's auc), the curve interpolated linearly at the limit, then divided by it.
    maps (N, S, S) float, masks (N, S, S) bool at the same resolution. None without any defect region."""
    from scipy.ndimage import label
    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks, dtype=bool)
    regions, count = np.zeros(masks.shape, dtype=np.int64), 0
    for i, mask in enumerate(masks):  # number the regions of all images 1, 2, ...; 0 = defect-free
        numbered, n = label(mask, structure=np.ones((3, 3), dtype=int))
        regions[i] = np.where(numbered > 0, numbered + count, 0)
        count += n
    sizes = np.bincount(regions.ravel(), minlength=count + 1)  # sizes[0] = defect-free pixels
    if count == 0 or sizes[0] == 0:
        return None
    order = np.argsort(-maps.ravel(), kind="stable")  # thresholds from the highest score down
    scores, region = maps.ravel()[order], regions.ravel()[order]
    fpr = np.cumsum(region == 0) / sizes[0]
    pro = np.cumsum(np.where(region > 0, 1.0 / sizes[region], 0.0)) / count
    last = np.append(np.diff(scores) != 0, True)  # a run of equal scores is one threshold: its end counts
    fpr = np.concatenate([[0.0], np.clip(fpr[last], 0, 1), [1.0]])
    pro = np.concatenate([[0.0], np.clip(pro[last], 0, 1), [1.0]])
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x <= x_max (x non-decreasing), y interpolated linearly at x_max."""
    from sklearn.metrics import auc
    inside = np.searchsorted(x, x_max, side="right")  # x[:inside] <= x_max
    xs, ys = x[:inside], y[:inside]
    if xs[-1] < x_max and inside < len(x):
        ys = np.append(ys, ys[-1] + (y[inside] - ys[-1]) * (x_max - xs[-1]) / (x[inside] - xs[-1]))
        xs = np.append(xs, x_max)
    return float(auc(xs, ys)) if len(xs) > 1 else 0.0


def localisation(kdad: KDAD, data, prep: Preprocess, amp, batch_size=32) -> dict:
    """Pixel AUROC and PRO of both anomaly maps on the test images against their masks (data.test_masks, cropped
    like the images): the paper's gradient map (pixel_auroc, pro) and the mismatch map (*_mismatch)."""
    off = int(prep.center(1).top[0])
    masks = data.test_masks[:, off:off + prep.size, off:off + prep.size]
    out = {}
    for kind, suffix in (("gradient", ""), ("mismatch", "_mismatch")):
        maps = anomaly_maps(kdad, data.test, prep, amp, kind, batch_size)
        out |= {f"pixel_auroc{suffix}": pixel_auroc(maps, masks), f"pro{suffix}": pro_score(maps, masks)}
    return out


## --------------------------------------------------------------------------------------------------------
## A saved run: config.json + student.safetensors (+ results.json), as train.py writes them (record.py).

def load_student(path: Path, student):
    sd = read_tensors(path)
    check_state_dict(path, sd, student.state_dict(), "student")
    check_finite(path, sd)
    student.load_state_dict(sd)
    return student


def load_run(run_dir, device, precision=None):
    """Rebuild teacher, student and data of a finished run, checking that the teacher file is unchanged."""
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise RunError(f"{run} is not a run folder (no config.json): pass a folder written by train.py")
    cfg = read_json(run / "config.json")
    s, t = cfg["settings"], cfg["teacher"]
    if not (run / "student.safetensors").is_file():
        raise RunError(f"{run} has no student.safetensors: the run did not finish; continue it with "
                       f"train.py ... --resume --out {run}")
    if not Path(t["path"]).is_file():
        raise RunError(f"teacher file {t['path']} of this run is gone: put it back where it was")
    if sha256(t["path"]) != t["sha256"]:
        raise RunError(f"teacher file {t['path']} has changed since training (sha256 differs from config.json): "
                       f"restore the original file or train again")
    teacher = load_teacher(t["path"], s["backbone"], s["image_size"], t["config"]["mean"], t["config"]["std"])
    teacher = place(teacher, device, s["backbone"])
    student = place(load_student(run / "student.safetensors", make_student(s["backbone"], teacher)), device,
                    s["backbone"])
    kdad = KDAD(teacher, student, taps_for(s["backbone"], teacher), s["lam"])
    crop_pct, dataset = s.get("crop_pct", CROP_PCT), s.get("dataset", "cifar10")  # older runs: CIFAR-10's
    source = open_source(s["data_dir"], s["data_root"], s["image_size"], crop_pct, dataset)
    data = one_class_data(source, s["cls"], s["seed"], s["limit"]).to(device)
    if data.class_name != s.get("class_name", data.class_name):
        raise RunError(f"the classes of {s['data_dir']} changed since training: class {s['cls']} is now folder "
                       f"{data.class_name!r}, was {s['class_name']!r}")
    prep = Preprocess(s["image_size"], teacher.cfg.mean, teacher.cfg.std, device, channels_last(s["backbone"]),
                      crop_pct)
    return cfg, kdad, data, prep, autocast(device, precision or s["precision"])


def evaluate_run(run_dir, device, precision=None, plots=None, batch_size=256) -> dict:
    """Recompute val/test AUROC of a finished run and print them beside results.json's; plots = None, "mismatch"
    or "gradient" (the kind of anomaly map drawn)."""
    cfg, kdad, data, prep, amp = load_run(run_dir, device, precision)
    plain = cfg["settings"].get("plain", False)
    val, val_embedding = score_images(kdad, data.val, prep, amp, batch_size, plain=plain, embed=True)
    test, test_embedding = score_images(kdad, data.test, prep, amp, batch_size, plain=plain, embed=True)
    out = {"val_auroc": auroc(val, data.val_labels.cpu()), "test_auroc": auroc(test, data.test_labels.cpu())}
    k = cfg["settings"].get("knn_k", 0)
    if k:  # the teacher-alone baseline, recomputed from a teacher pass over the training images
        bank = teacher_embeddings(kdad, data.train, prep, amp, batch_size, plain)
        out |= knn_aurocs(bank, val_embedding, test_embedding, data, k)
    if data.test_masks is not None:
        out |= localisation(kdad, data, prep, amp)
    saved = read_json(Path(run_dir) / "results.json") if (Path(run_dir) / "results.json").is_file() else {}
    for key, v in out.items():
        print(f"{key}: {fmt(v, 4, 1)}" + (f"  (results.json: {fmt(saved[key], 4, 1)})" if key in saved else ""))
    if plots:
        draw_run(Path(run_dir), cfg, kdad, data, prep, amp, test, out["test_auroc"], plots)
    return out


def fmt(x, digits=2, scale=100.0) -> str:
    """An AUROC for printing: 'n/a' where there is none."""
    return "n/a" if x is None else f"{x * scale:.{digits}f}"


## --------------------------------------------------------------------------------------------------------
## The per-class table: runs grouped by what makes them comparable, mean +- std over seeds within a group.

def comparable(cfg: dict) -> tuple:
    """What runs must share to be seeds of one experiment: backbone, teacher (by content), data and recipe."""
    s = cfg["settings"]
    data = s.get("data") or (s["data_dir"] or TORCHVISION_CIFAR10)  # runs written before `data` existed
    return (s["backbone"], s.get("dataset", "cifar10"), cfg["teacher"]["sha256"], data, s["epochs"], s["batch_size"],
            s["lr"], s["lam"], s["image_size"], s.get("crop_pct", CROP_PCT), s["limit"], s["select"],
            tuple(s.get("teacher_mean") or ()), tuple(s.get("teacher_std") or ()))


def describe_group(cfg: dict, short=False) -> str:
    """The group's title: backbone, teacher and data (short, for the chart), then the recipe."""
    s, t = cfg["settings"], cfg["teacher"]
    data = "CIFAR-10 (torchvision)" if not s["data_dir"] else Path(s["data_dir"]).name
    if s.get("dataset") == "mvtec":
        data = f"MVTec AD ({data})"
    teacher = t.get("short_name") or Path(t["name"]).name
    epochs = f"{s['epochs']} epoch" + "s" * (s["epochs"] != 1)
    if short:
        return f"KDAD, {s['backbone']}, teacher {teacher}, data {data}, {s['image_size']} px, {epochs}"
    return (f"{s['backbone']}, teacher {teacher}, data {data}, {epochs}, batch {s['batch_size']}, "
            f"lr {s['lr']:g}, lambda {s['lam']:g}, {s['image_size']} px"
            + (f", limit {s['limit']}" if s["limit"] else "") + (", selected by val AUROC" if
                                                                  s["select"] == "val-auroc" else ""))


def on_cifar10(cfg: dict) -> bool:
    data = cfg.get("data")
    return data["cifar10"] if data else not cfg["settings"]["data_dir"]  # older runs: torchvision means CIFAR-10


def published_for(cfg: dict) -> tuple[str | None, dict, dict]:
    """(source, {class: image AUROC}, {class: pixel AUROC}) of the published figures comparable with this group:
    CIFAR-10 runs (torchvision's, or a folder of exactly its classes) and MVTec AD runs on their whole test sets (no
    --limit), matched by class name."""
    s = cfg["settings"]
    dataset = s.get("dataset", "cifar10")
    if (dataset == "cifar10" and not on_cifar10(cfg)) or s.get("limit"):  # --limit: not the protocol's test set
        return None, {}, {}
    return PUBLISHED.get((dataset, s["backbone"]), (None, {}, {}))


def group_rows(runs: list[tuple[dict, dict]]) -> tuple[list[dict], str | None]:
    """Rows of one group's table from (config, results) pairs: one per class (figures in %, the mean over its
    runs, the test AUROC's std over them), then the mean over classes; and the published figures' source."""
    by_class = {}
    for cfg, r in runs:
        by_class.setdefault((r["cls"], r["class_name"]), []).append(r)
    source, published, published_pixel = published_for(runs[0][0])
    rows = []
    for (cls, name), rs in sorted(by_class.items()):
        row = {"class": cls, "name": name, "runs": len(rs), "published": published.get(name),
               "published_pixel": published_pixel.get(name)}
        for key in MEANS:  # a figure some runs lack (older runs, --knn-k 0, no anomalous validation) is n/a
            values = [r[key] for r in rs if r.get(key) is not None]
            row[key] = 100 * float(np.mean(values)) if values and len(values) == len(rs) else None
        aucs = np.array([r["test_auroc"] for r in rs]) * 100
        row["std"] = float(aucs.std(ddof=1)) if len(aucs) > 1 else None
        rows.append(row)
    mean = {"class": "mean", "name": "", "runs": sum(r["runs"] for r in rows), "std": None}
    for key in MEANS + ("published", "published_pixel"):
        values = [r[key] for r in rows]
        mean[key] = float(np.mean(values)) if values and all(v is not None for v in values) else None
    for key in ("published", "published_pixel"):  # a published mean is over all the paper's classes, or none
        if len(rows) != len(published):
            mean[key] = None
    return rows + [mean], source if any(r["published"] is not None for r in rows) else None


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; columns no row has a value for are left out."""
    shown = [(k, t) for k, t in COLUMNS if k in ("test_auroc", "runs") or any(r.get(k) is not None for r in rows)]
    lines = ["| class | name | " + " | ".join(t for _, t in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for r in rows:
        cells = []
        for key, _ in shown:
            if key == "runs":
                cells.append(str(r["runs"]))
            elif key == "test_auroc" and r["std"] is not None:
                cells.append(f"{fmt(r[key], scale=1)} ± {r['std']:.2f}")
            elif key.startswith("published"):
                cells.append(fmt(r[key], scale=1) if r[key] is not None else "")
            else:
                cells.append(fmt(r[key], scale=1))
        lines.append(f"| {r['class']} | {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(paths) -> list[dict]:
    """One table per group of comparable runs among the finished runs in `paths` (see record.run_folders): each
    {"title", "rows", "markdown", "published_label"}. Unfinished runs are named on stderr and left out."""
    groups = {}
    for run in run_folders(paths):
        if not (run / "results.json").is_file():
            print(f"note: {run} is unfinished (no results.json): left out of the table", file=sys.stderr)
            continue
        cfg = read_json(run / "config.json")
        groups.setdefault(comparable(cfg), []).append((cfg, read_json(run / "results.json"), run))
    if not groups:
        raise RunError(f"no finished run in {', '.join(map(str, paths))} (no results.json): nothing to tabulate")
    out = []
    for runs in groups.values():
        seen = {}
        for _, r, run in runs:  # a seed counted twice would shrink the std and inflate the count of runs
            first = seen.setdefault((r["cls"], r.get("seed")), run)
            if first != run:
                raise RunError(f"{first} and {run} are the same run (class {r['class_name']}, seed {r.get('seed')}, "
                               f"the same settings): pass only one of them")
        runs = [(cfg, r) for cfg, r, _ in runs]
        rows, label = group_rows(runs)
        title = describe_group(runs[0][0])
        published = f"\n\npublished: {label}" if label else ""
        out.append({"title": title, "chart_title": describe_group(runs[0][0], short=True), "rows": rows,
                    "published_label": label,
                    "markdown": f"### {title}\n\n{markdown(rows)}{published}"})
    return out


def table_prefix(paths) -> Path:
    """Where a table goes by default: inside the one folder of runs given (a --cls all folder), else in the
    runs' common parent folder."""
    runs = [Path(p).resolve() for p in paths]
    if len(runs) == 1 and not (runs[0] / "config.json").is_file():
        return runs[0] / "table"
    parents = [r.parent for r in runs]
    common = Path(*[parts[0] for parts in zip(*(p.parts for p in parents)) if len(set(parts)) == 1])
    return common / "table"


def write_table(paths, out_prefix=None) -> str:
    """Write the tables as one .md and one .csv (and, with matplotlib, one bar chart per group) at out_prefix
    (default: table_prefix); returns the text to print, the paths written included."""
    groups = tables(paths)
    out = Path(out_prefix) if out_prefix else table_prefix(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out.with_suffix(".md"), out.with_suffix(".csv")]
    out.with_suffix(".md").write_text("\n\n".join(g["markdown"] for g in groups) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        order = ["class", "name", "test_auroc", "std"] + [k for k, _ in COLUMNS if k != "test_auroc"]
        writer = csv.DictWriter(f, fieldnames=["group", *order])
        writer.writeheader()
        for g in groups:
            writer.writerows({"group": g["title"]} | r for r in g["rows"])
    for stale in [out.with_suffix(".png"), *out.parent.glob(f"{out.name}-[0-9]*.png")]:  # an earlier table's charts
        stale.unlink(missing_ok=True)
    for k, g in enumerate(groups, start=1):
        png = out.with_suffix(".png") if len(groups) == 1 else out.with_name(f"{out.name}-{k}.png")
        try:
            table_png(png, g["rows"], g["chart_title"], f"published: {g['published_label'] or 'none'}")
            written.append(png)
        except PlotError as e:
            print(f"note: no bar chart ({e})")
            break
    return "\n\n".join(g["markdown"] for g in groups) + "\n\nwrote " + ", ".join(map(str, written))


def main(argv=None):
    args = cli.evaluate_args(argv)
    try:
        if args.table:
            print(write_table(args.runs, args.table_out))
            return 0
        device = pick_device(args.device)
        if args.plots:
            pyplot()  # PlotError now, not after minutes of scoring, when matplotlib is missing
        for run in run_folders(args.runs):
            print(f"{run}:")
            evaluate_run(run, device, args.precision, args.maps if args.plots else None, args.batch_size)
    except (RunError, CheckpointError, DataError, PlotError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e} (check the path, its permissions and the free space)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.ready_for_interrupts()
    sys.exit(main())
