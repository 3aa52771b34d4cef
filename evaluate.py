"""Score images, compute ROC AUC, localise defects, and re-evaluate a saved run.

Score convention, used everywhere: a higher anomaly score means "more anomalous", and ROC AUC treats the
anomalous images (label 1) as the positive class. The AUROC is the probability that a randomly drawn anomalous
image scores higher than a randomly drawn normal one: 0.5 is chance, 1.0 a perfect ranking.

    python evaluate.py runs/vit-vit-b16-cifar10-cat-s0             # recompute val/test AUROC from the saved student
    python evaluate.py runs/vit-vit-b16-cifar10-all-s0             # every class run of a --cls all folder
    python evaluate.py runs/vit-... --plots                        # and draw the figures (needs matplotlib)
    python evaluate.py runs/vgg-... --plots --maps gradient        # with the paper's gradient maps
    python evaluate.py --table runs/vit-*-all-s0 runs/vit-*-all-s1 # per-class table (mean +- std over seeds)

Read in order: score_images and auroc (train.py scores with them too, so training-time and after-the-fact numbers
come from the same code), then the localisation metrics. The tables are tables.py's.
"""
import sys
import time

import cli

if __name__ == "__main__":  # flags first: --help and a mistyped flag answer before torch's 5-second import
    cli.evaluate_args(sys.argv[1:])
    cli.quiet_interrupt()

from dataclasses import asdict  # the rest waits for the flag check above
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError, check_finite, check_state_dict, read_tensors, sha256
from cli import RunError, autocast, note, pick_device, pick_precision, progress, set_numerics
from data import CROP_PCT, DataError, Preprocess, batches
from distill import KDAD, channels_last, load_teacher, make_student, place, taps_for
from folders import open_source
from plots import PlotError, draw_run, pyplot
from record import (EVALUATE_KEYS, ImagesChanged, data_as_recorded, read_json, read_run_config, run_folders,
                    teacher_changes)
from tables import fmt, write_table
from writes import os_error_line


## --------------------------------------------------------------------------------------------------------
## Scoring and AUROC.

RECORDINGS = []  # lists that collect something per forward pass (knn.recorded): a retried batch is recorded once


def over_images(fn, images, prep: Preprocess, amp, batch_size: int, desc: str, plain=False) -> list:
    """fn(idx, x) for each preprocessed, center-cropped batch x of uint8 images (N, 3, h, w) (idx: the batch's
    image indices, on the images' device), in order, under the precision's autocast, with a progress bar; returns
    the results as a list, one per batch. When a GPU runs out of memory, the batch size is halved and the batch
    run again, with a note; at one image per batch the error is raised."""
    out, done, n = [], 0, len(images)
    order, center = torch.arange(n, device=images.device), prep.center(n).to(images.device)  # no copy per batch
    with progress(None, n, desc, unit="img") as bar:
        while done < n:
            marks = [len(r) for r in RECORDINGS]
            try:
                for idx, x in batches(images, order[done:], center[done:], batch_size, prep, plain):
                    with amp():
                        out.append(fn(idx, x))
                    done += len(idx)
                    bar.update(len(idx))
                    marks = [len(r) for r in RECORDINGS]
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                for r, m in zip(RECORDINGS, marks, strict=True):
                    del r[m:]
                batch_size //= 2
                note(f"out of GPU memory while {desc}: going on with {batch_size} images at a time "
                     f"(--eval-batch-size {batch_size} starts there)")
    return out


@torch.inference_mode()
def score_images(kdad: KDAD, images, prep: Preprocess, amp, batch_size=256, train_taps=False, plain=False,
                 cache=None):
    """Per-image anomaly scores (N,) float32 on the CPU of uint8 images (N, 3, h, w), center-cropped, teacher and
    student in one pass per batch (KDAD.score); train_taps=True gives the per-image training loss instead, with
    the teacher's features read from `cache` (cache.FeatureCache of these images) when given. The scores stay on
    the device until the last batch (one wait at the end, not one per batch). Inside knn.recorded, a forward hook
    on the teacher also keeps each image's feature for the kNN baseline; scoring itself does not know."""
    kdad.student.eval()
    parts = over_images(lambda idx, x: kdad.score(x, train_taps, cache.features(idx) if cache else None).float(),
                        images, prep, amp, batch_size, "scoring", plain)
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


class NonFinite(ValueError):
    """Scores, a loss, maps or features holding NaN or infinity (a diverged student, or an overflow at this
    precision); str(e) says which values and how many."""


def finite(values, what: str):
    """`values` (a tensor or array of any shape) as they are; NonFinite('non-finite <what> (n of N NaN/inf)')
    when any is NaN or infinite."""
    bad = int((~torch.isfinite(torch.as_tensor(values))).sum())
    if bad:
        raise NonFinite(f"non-finite {what} ({bad} of {torch.as_tensor(values).numel()} NaN/inf)")
    return values


def auroc(scores, labels, what: str = "anomaly scores") -> float | None:
    """ROC AUC in [0, 1] with anomalous (1) as the positive class and higher score = more anomalous
    (scikit-learn's roc_auc_score); None when the labels hold one kind only (no AUROC exists). Raises NonFinite
    (naming `what`) for NaN/inf scores."""
    from sklearn.metrics import roc_auc_score  # here: scikit-learn takes a second to import, a run needs it at the end
    finite(np.asarray(scores), what)
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, np.asarray(scores)))


## --------------------------------------------------------------------------------------------------------
## Localisation (MVTec AD): anomaly maps against the defect masks. Maps and masks are compared at the network's input
## resolution (the crop, S x S pixels): the masks are brought there by the images' own geometry (mvtec.mvtec_masks).

PRO_FPR_LIMIT = 0.3  # the MVTec AD authors' integration limit


def anomaly_maps(kdad: KDAD, images, prep: Preprocess, amp, kind: str, batch_size=32) -> torch.Tensor:
    """(N, S, S) float32 CPU anomaly maps of uint8 images (N, 3, h, w), center-cropped, of kind 'mismatch' or
    'gradient' (KDAD.map); the gradient needs a backward pass per batch, hence the small default batch."""
    kdad.student.eval()
    return torch.cat(over_images(lambda _, x: kdad.map(x, kind).cpu(), images, prep, amp, batch_size,
                                 f"{kind} maps"))


def pixel_auroc(maps, masks) -> float | None:
    """ROC AUC in [0, 1] of every pixel's map value against its mask (scikit-learn's roc_auc_score), pooled over all
    test images (the good ones' pixels are all normal), as the MVTec AD authors' evaluation pools them. maps (N, S, S)
    float, masks (N, S, S) bool, same resolution. None when no pixel is defective."""
    return auroc(np.asarray(maps, dtype=np.float64).ravel(), np.asarray(masks).ravel().astype(np.int64),
                 "anomaly-map pixels")


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
    maps, masks = finite(np.asarray(maps, dtype=np.float64), "anomaly-map pixels"), np.asarray(masks, dtype=bool)
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
## The figures of a trained student, as train.py reports them and evaluate.py recomputes them.

def final_scores(kdad: KDAD, data, prep: Preprocess, amp, batch_size=256, knn_k=0, plain=False, cache=None):
    """(figures, test scores (N,) float32): validation and test AUROC of one scoring pass each, the teacher-alone
    kNN baseline's AUROCs beside (knn_k > 0; its features come from the same teacher passes, knn.recorded) and, on
    MVTec AD, the localisation metrics; figures["score_images_per_s"] is the speed of the two scoring passes.
    Raises NonFinite where scores or features are NaN/inf."""
    import knn  # knn.py builds on this module's scoring
    t0 = time.time()
    with knn.recorded(kdad) as features:  # the baseline keeps the teacher's image features of these same passes
        val = score_images(kdad, data.val, prep, amp, batch_size, plain=plain)
        test = score_images(kdad, data.test, prep, amp, batch_size, plain=plain)
    out = {"val_auroc": auroc(val, data.val_labels.cpu(), "validation scores"),
           "test_auroc": auroc(test, data.test_labels.cpu(), "test scores"),
           "score_images_per_s": (len(val) + len(test)) / (time.time() - t0)}
    if knn_k:
        out |= knn.baseline(kdad, data, prep, amp, knn_k, features, batch_size, cache, plain)
    if data.test_masks is not None:  # MVTec AD: where the defects are, against the masks
        out |= localisation(kdad, data, prep, amp)
    return out, test


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
    cfg = read_run_config(run, EVALUATE_KEYS)
    s, t = cfg["settings"], cfg["teacher"]
    if not (run / "student.safetensors").is_file() and cfg.get("stopped", "").startswith("non-finite"):
        raise RunError(f"{run} has no student.safetensors: it stopped with {cfg['stopped'].split(';')[0]}; train it "
                       f"again with a lower --lr (train.py ... --overwrite --out {run})")
    if not (run / "student.safetensors").is_file():
        raise RunError(f"{run} has no student.safetensors: the run did not finish; continue it with "
                       f"train.py ... --resume --out {run}")
    if not Path(t["path"]).is_file():
        raise RunError(f"teacher file {t['path']} of this run is gone: put it back where it was")
    if sha256(t["path"]) != t["sha256"]:
        raise RunError(f"teacher file {t['path']} has changed since training (sha256 differs from config.json): "
                       f"restore the original file or train again")
    teacher = load_teacher(t["path"], s["backbone"], s["image_size"], t["config"]["mean"], t["config"]["std"],
                           s.get("teacher_heads"))
    changed = teacher_changes(t["config"], asdict(teacher.cfg))
    if changed:  # the same file, described otherwise: its config.json beside it changed or is gone
        raise RunError(f"the teacher of {run} is described otherwise than when it was trained ({changed}): its "
                       f"config.json beside {t['path']} was changed or removed; put it back as it was")
    teacher = place(teacher, device, s["backbone"])
    student = place(load_student(run / "student.safetensors", make_student(s["backbone"], teacher)), device,
                    s["backbone"])
    kdad = KDAD(teacher, student, taps_for(s["backbone"], teacher), s["lam"])
    crop_pct, dataset = s.get("crop_pct", CROP_PCT), s.get("dataset", "cifar10")  # older runs: CIFAR-10's
    source = open_source(s["data_dir"], s["data_root"], s["image_size"], crop_pct, dataset)
    try:  # exactly the images the run recorded (record.py); added files are named, changed ones refused
        data = data_as_recorded(source, s["cls"], s["seed"], s["limit"], cfg, s["data_dir"]).to(device)
    except ImagesChanged as e:
        raise RunError(f"{run}: {e}; scored now, its figures would be another data set's, not this run's: put the "
                       f"images back as they were, or train a new run on the folder as it is") from None
    if data.class_name != s.get("class_name", data.class_name):
        raise RunError(f"the classes of {s['data_dir']} changed since training: class {s['cls']} is now folder "
                       f"{data.class_name!r}, was {s['class_name']!r}")
    prep = Preprocess(s["image_size"], teacher.cfg.mean, teacher.cfg.std, device, channels_last(s["backbone"]),
                      crop_pct)
    precision = scoring_precision(precision, s["precision"], device)
    set_numerics(precision)
    return cfg, kdad, data, prep, autocast(device, precision)


def scoring_precision(asked: str | None, trained: str, device) -> str:
    """--precision if given (checked against the device), else the run's own; a run trained in bf16 is scored in
    what --precision auto picks on a GPU that only emulates bf16, with a note."""
    if asked:
        return pick_precision(asked, device)
    try:
        return pick_precision(trained, device)
    except RunError:
        chosen = pick_precision("auto", device)
        note(f"the run trained in {trained}, which this GPU only emulates: scoring in {chosen} (scores can differ in "
             f"the last digits)")
        return chosen


def evaluate_run(run_dir, device, precision=None, plots=None, batch_size=256) -> dict:
    """Recompute val/test AUROC of a finished run and print them beside results.json's; plots = None, "mismatch"
    or "gradient" (the kind of anomaly map drawn)."""
    cfg, kdad, data, prep, amp = load_run(run_dir, device, precision)
    s = cfg["settings"]
    figures, test = final_scores(kdad, data, prep, amp, batch_size, s.get("knn_k", 0), s.get("plain", False))
    out = {key: v for key, v in figures.items() if key.endswith(("auroc", "pro", "mismatch"))}  # not the timings
    saved = read_json(Path(run_dir) / "results.json") if (Path(run_dir) / "results.json").is_file() else {}
    for key, v in out.items():
        print(f"{key}: {fmt(v, 4, 1)}" + (f"  (results.json: {fmt(saved[key], 4, 1)})" if key in saved else ""))
    if plots:
        draw_run(Path(run_dir), cfg, kdad, data, prep, amp, test, out["test_auroc"], plots)
    return out


def main(argv=None):
    """`python evaluate.py RUN...`: exit 0, 2 for bad input (one line each; the other runs go on), 3 for a run
    whose scores are not finite (a diverged student)."""
    args = cli.evaluate_args(argv)
    try:
        if args.table:
            print(write_table(args.runs, args.table_out))
            return 0
        device = pick_device(args.device)
        if args.plots:
            pyplot()  # PlotError now, not after minutes of scoring, when matplotlib is missing
        runs = run_folders(args.runs)
        codes = []
        for run in runs:
            print(f"{run}:")
            try:
                evaluate_run(run, device, args.precision, args.maps if args.plots else None, args.batch_size)
            except (RunError, CheckpointError, DataError, NonFinite) as e:  # this run only: the others go on
                codes.append(3 if isinstance(e, NonFinite) else 2)
                line = f"{e}: this run's student gives NaN/inf here (try --precision fp32; a diverged run is trained " \
                       f"again with a lower --lr)" if isinstance(e, NonFinite) else str(e)
                named = len(runs) == 1 or line.startswith(str(run))  # which run, said once
                print(f"error: {line}" if named else f"error: {run}: {line}", file=sys.stderr)
        return max(codes, default=0)
    except (RunError, CheckpointError, DataError, PlotError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:  # scoring halves its batch first: this is one image at a time
        print("error: out of GPU memory even one image at a time: free the GPU (nvidia-smi shows what holds it), "
              "or --device cpu", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only folder for the plots or the table: what, where, free space
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    cli.ready_for_interrupts()
    sys.exit(main())

