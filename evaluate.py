"""Score images, compute ROC AUC, re-evaluate a saved run, and tabulate runs.

Score convention, used everywhere: a higher anomaly score means "more anomalous", and ROC AUC treats the
anomalous images (label 1) as the positive class. An AUROC of 0.5 is chance, 1.0 a perfect ranking.

    python evaluate.py runs/vit-vit-b16-cifar10-cat-s0            # recompute val/test AUROC from the saved student
    python evaluate.py runs/vit-... --plots                        # and draw the figures (needs matplotlib)
    python evaluate.py runs/vgg-... --plots --maps gradient        # with the paper's gradient maps
    python evaluate.py --table runs/vit-*-s0 runs/vit-*-s1         # per-class table (mean +- std over seeds)

train.py uses `score_images` and `auroc` from here, so training-time and after-the-fact numbers come from the
same code.
"""
import argparse
import csv
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from checkpoint import CheckpointError, check_finite, check_state_dict, read_tensors, sha256
from data import DataError, Preprocess, batches, center, one_class_data, open_source, progress
from distill import KDAD, channels_last, load_teacher, make_student, place, taps_for
from plots import PlotError, draw_run, table_png

# published per-class test AUROC (%) of shared/docs/method.md, classes 0..9
PUBLISHED = {
    "vgg": [90.53, 90.35, 79.66, 77.02, 86.71, 91.40, 88.98, 86.78, 91.45, 88.91],  # KDAD paper, VGG16
    "vit": [96.78, 98.16, 96.20, 93.55, 96.52, 94.72, 97.96, 97.71, 98.01, 98.68],  # ViT reproduction
}


class RunError(ValueError):
    """A run folder that cannot be evaluated, or settings that make no sense."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line (what is wrong, where to look) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


## --------------------------------------------------------------------------------------------------------
## Device and precision, chosen once per process.

def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise RunError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} but this machine has no usable CUDA GPU: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RunError(f"--device {name} but this machine has {torch.cuda.device_count()} GPU(s): use cuda:0 .. "
                       f"cuda:{torch.cuda.device_count() - 1}")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 only: CUDA compute capability 8.0+ (Ampere on), or a CPU with AVX-512 BF16. Older GPUs
    (T4, V100) only emulate it, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    is_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return device.type == "cpu" and bool(is_bf16())


def pick_precision(name: str, device: torch.device) -> str:
    """'auto' is bf16 where the hardware has it (CUDA, CPUs with AVX-512 BF16), else fp32."""
    return ("bf16" if bf16_supported(device) else "fp32") if name == "auto" else name


def autocast(device: torch.device, precision: str):
    """A factory of autocast contexts: bf16 compute with fp32 master weights, or plain fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


## --------------------------------------------------------------------------------------------------------
## Scoring and AUROC.

@torch.inference_mode()
def score_images(kdad: KDAD, images, prep: Preprocess, amp, batch_size=256, train_taps=False, plain=False):
    """Per-image scores (CPU float tensor) of uint8 images, center-cropped; teacher and student in one pass."""
    kdad.student.eval()
    order = torch.arange(len(images))
    scores = []
    n = (len(images) + batch_size - 1) // batch_size
    for _, x in progress(batches(images, order, center(len(images), prep.size), batch_size, prep, plain), n,
                         "scoring"):
        with amp():
            scores.append(kdad.score(x, train_taps).float())
    return torch.cat(scores).cpu()


def auroc(scores, labels) -> float:
    """ROC AUC with anomalous (1) as the positive class and higher score = more anomalous."""
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


## --------------------------------------------------------------------------------------------------------
## A saved run: config.json + student.safetensors (+ results.json), as train.py writes them.

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}): the run folder is damaged") from None


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
    source = open_source(s["data_dir"], s["data_root"], s["image_size"])
    data = one_class_data(source, s["cls"], s["seed"], s["limit"]).to(device)
    prep = Preprocess(s["image_size"], teacher.cfg.mean, teacher.cfg.std, device, channels_last(s["backbone"]))
    return cfg, kdad, data, prep, autocast(device, precision or s["precision"])


def evaluate_run(run_dir, device, precision=None, plots=None, batch_size=256) -> dict:
    """Recompute val/test AUROC of a finished run and print them beside results.json's; plots = None, "mismatch"
    or "gradient" (the kind of anomaly map drawn)."""
    cfg, kdad, data, prep, amp = load_run(run_dir, device, precision)
    plain = cfg["settings"].get("plain", False)
    val = score_images(kdad, data.val, prep, amp, batch_size, plain=plain)
    test = score_images(kdad, data.test, prep, amp, batch_size, plain=plain)
    out = {"val_auroc": auroc(val, data.val_labels.cpu()), "test_auroc": auroc(test, data.test_labels.cpu())}
    saved = read_json(Path(run_dir) / "results.json") if (Path(run_dir) / "results.json").is_file() else {}
    for k, v in out.items():
        print(f"{k}: {v:.4f}" + (f"  (results.json: {saved[k]:.4f})" if k in saved else ""))
    if plots:
        draw_run(Path(run_dir), cfg, kdad, data, prep, amp, test, out["test_auroc"], plots)
    return out


## --------------------------------------------------------------------------------------------------------
## The per-class table.

def find_results(paths) -> list[Path]:
    """results.json of each run folder given, or of the run folders inside a `--cls all` folder."""
    found = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            found.append(p / "results.json")
        else:
            inner = sorted(p.glob("*/results.json"))
            if not inner:
                raise RunError(f"{p} holds no finished run (no results.json in it or its subfolders)")
            found += inner
    return found


def table(paths) -> tuple[str, list[dict]]:
    """Markdown table of test AUROC (%) per class: mean and, where several runs share a class, std over seeds."""
    by_class = {}
    results = [read_json(p) for p in find_results(paths)]
    for r in results:
        by_class.setdefault((r["cls"], r["class_name"]), []).append(r)
    backbones = {r["backbone"] for r in results}
    published = PUBLISHED.get(backbones.pop()) if len(backbones) == 1 else None
    rows = []
    for (cls, name), rs in sorted(by_class.items()):
        aucs = np.array([r["test_auroc"] for r in rs]) * 100
        rows.append({"class": cls, "name": name, "test_auroc": aucs.mean(),
                     "std": aucs.std(ddof=1) if len(aucs) > 1 else None, "runs": len(aucs),
                     "val_auroc": 100 * np.mean([r["val_auroc"] for r in rs]),
                     "published": published[cls] if published and cls < len(published) else None})
    rows.append({"class": "mean", "name": "", "test_auroc": np.mean([r["test_auroc"] for r in rows]),
                 "std": None, "runs": sum(r["runs"] for r in rows),
                 "val_auroc": np.mean([r["val_auroc"] for r in rows]),
                 "published": (np.mean([r["published"] for r in rows]) if published and len(rows) == 10 else None)})
    lines = ["| class | name | test AUROC (%) | val AUROC (%) | runs | published (%) |", "|---|---|---|---|---|---|"]
    for r in rows:
        auc = f"{r['test_auroc']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
        pub = f"{r['published']:.2f}" if r["published"] is not None else ""
        lines.append(f"| {r['class']} | {r['name']} | {auc} | {r['val_auroc']:.2f} | {r['runs']} | {pub} |")
    return "\n".join(lines), rows


def write_table(paths, out_prefix) -> str:
    """Write the table as .md and .csv (and, with matplotlib, a bar chart against the published numbers)."""
    md, rows = table(paths)
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        table_png(out.with_suffix(".png"), rows, "published (shared/docs/method.md)")
    except PlotError as e:
        print(f"note: no bar chart ({e})")
    return md


def main(argv=None):
    p = OneLineParser(description="Re-evaluate KDAD runs, or tabulate them.")
    p.add_argument("runs", nargs="+", help="run folder(s) written by train.py")
    p.add_argument("--table", action="store_true", help="print and write the per-class table of the runs")
    p.add_argument("--table-out", default="table", help="path prefix of the table's .md and .csv (default: table)")
    p.add_argument("--plots", action="store_true", help="write ROC, histogram, anomaly-map and training-curve PNGs "
                                                        "into the run folder (needs matplotlib)")
    p.add_argument("--maps", choices=["mismatch", "gradient"], default="mismatch",
                   help="anomaly maps: student/teacher mismatch per location (default), or the paper's gradient "
                        "of the score with respect to the pixels, smoothed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: the run's own precision")
    p.add_argument("--batch-size", type=int, default=256, help="scoring batch size (default: 256)")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    try:
        if args.table:
            print(write_table(args.runs, args.table_out))
            print(f"wrote {args.table_out}.md and {args.table_out}.csv")
            return 0
        device = pick_device(args.device)
        for run in args.runs:
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
    sys.exit(main())
