"""What a user chooses and sees on the command line: the flags of train.py, evaluate.py and bench.py, the device and
precision they run on, and the progress bars they watch.

This module imports no torch at module level: train.py and evaluate.py parse their flags with it *before* importing
torch (about 5 s and 900 MB with a CUDA build), so `--help` and a mistyped flag answer at once. The device helpers
import torch when they are called.

    args = cli.train_args(["--backbone", "vit", "--cls", "3"])   # argparse.Namespace; bad flags exit with one line
    device = cli.pick_device(args.device)                         # torch.device, checked against this machine
    for x in cli.progress(batches, total=len(batches), desc="epoch 1"): ...
"""
import argparse
import importlib.util
import os
import signal
import sys
from contextlib import nullcontext

from checkpoint import DEFAULT_TEACHER, PRESETS, CheckpointError, check_offline


NO_MATPLOTLIB = "--plots needs matplotlib, which is not installed: pip install matplotlib"


class RunError(ValueError):
    """A run folder or a setting that cannot be used; the message says what is wrong and what to do."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line gets one line (what is wrong, where to look) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


## --------------------------------------------------------------------------------------------------------
## Messages: what a run leaves out or changes is said once, in one line with a bounded list of names.

SHOWN = 5  # at most this many names in one printed line; the full lists go into config.json


def note(message: str):
    """Everything left out or changed is said once, on stderr, beside the run's own output."""
    print(f"note: {message}", file=sys.stderr)


def counted(n: int, one: str, many: str) -> str:
    """'1 file that is not an image' / '3 files that are not images'."""
    return f"{n} {one if n == 1 else many}"


def named(items, shown=SHOWN) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more': a bounded list of names for one printed line."""
    items = [str(i) for i in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def quiet_interrupt():
    """Until the script's own handling starts: Ctrl-C ends the process with one line, not a traceback from inside
    an import (nothing has been written yet). The script puts Python's default handler back when it is ready."""
    def stop(*_):
        print("stopped: interrupted while starting; nothing was written", file=sys.stderr)
        os._exit(130)
    signal.signal(signal.SIGINT, stop)


def ready_for_interrupts():
    signal.signal(signal.SIGINT, signal.default_int_handler)


## --------------------------------------------------------------------------------------------------------
## train.py

def train_parser() -> OneLineParser:
    p = OneLineParser(prog="train.py",
                      description="Multiresolution knowledge distillation for anomaly detection (KDAD): train a "
                                  "student on one normal class and report its test ROC AUC.")
    g = p.add_argument_group("what to train")
    g.add_argument("--backbone", required=True, choices=["vgg", "vit"])
    g.add_argument("--cls", required=True,
                   help="normal class: a class folder's name (e.g. cat); an index (0-9 on CIFAR-10 in torchvision "
                        "order, 3 = cat; otherwise the natural order of train/'s class folders; where the folders are "
                        "named by numbers, a number is a name); name:X or index:N where a number could mean two "
                        "classes (refused until then); or all (every class with train and test images)")
    g.add_argument("--teacher", help=f"preset ({', '.join(PRESETS)}), http(s) address or .safetensors path "
                                     f"(default: the recipe's: " + "; ".join(
                                         f"{d} {', '.join(f'{b} {t}' for b, t in ts.items())}"
                                         for d, ts in DEFAULT_TEACHER.items()) + ")")
    g.add_argument("--cache-dir", help="where teachers are downloaded and converted (default: the Hugging Face cache "
                                       "for hub files, HF_HOME; ~/.cache/kdad-vit, KDAD_CACHE, for the rest)")
    g.add_argument("--teacher-mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="input mean the teacher expects (default: its checkpoint family's)")
    g.add_argument("--teacher-std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="input std the teacher expects (default: its checkpoint family's)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["cifar10", "mvtec"], default="cifar10",
                   help="cifar10 (default): one-class classification on CIFAR-10, or on --data-dir laid out as "
                        "train/<class>/ and test/<class>/; mvtec: --data-dir is an MVTec AD folder, --cls a category "
                        "(or all), localisation scored against the defect masks; each with its recipe")
    g.add_argument("--data-dir", help="image folder with train/<class>/ and test/<class>/ (default: CIFAR-10), or "
                                      "the MVTec AD folder")
    g.add_argument("--data-root", default="./data", help="where torchvision's CIFAR-10 is downloaded (default: ./data)")
    g.add_argument("--image-size", type=int, help="network input size (CIFAR-10: crop of a 256/224 larger resize, "
                                                  "default 224; MVTec AD: the whole image resized, vgg 128, vit 224)")
    g.add_argument("--limit", type=int, help="at most N images per split, for quick runs (default: all)")
    g = p.add_argument_group("recipe (defaults: the paper's for vgg, the reproduction's for vit; MVTec AD's differ)")
    g.add_argument("--epochs", type=int, help="vgg 200, vit 10 (MVTec AD: vgg 600, vit 50)")
    g.add_argument("--batch-size", type=int, help="vgg 64, vit 128 (MVTec AD: vgg 64, vit 16)")
    g.add_argument("--lr", type=float, help="vgg 1e-3 (Adam), vit 5e-5 (AdamW, x0.2 after epoch 5; MVTec AD after 25)")
    g.add_argument("--lam", type=float, help="weight of the MSE (value) term (0.01; MVTec AD 0.5)")
    g.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="seeds the split, the student and the batches (default: 0); several seeds run one job each")
    g.add_argument("--select", choices=["final", "val-auroc"], default="final",
                   help="model selection: the final epoch (default), or the best validation AUROC, which uses "
                        "anomaly labels of the validation images (recorded in results.json)")
    g.add_argument("--knn-k", type=int, default=2,
                   help="neighbours of the teacher-alone kNN baseline scored beside KDAD (default: 2; 0 skips it)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default: runs/<backbone>-<teacher>-<class>-s<seed>, plus every "
                                 "setting that changes the result and is not the recipe's, e.g. -32px-limit300-1ep-"
                                 "batch16; with several seeds, OUT/s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast with fp32 weights, or fp32 (default: bf16 where the hardware has it)")
    g.add_argument("--compile", action="store_true", help="torch.compile teacher and student")
    g.add_argument("--no-cache", action="store_true", help="recompute the teacher's features every epoch (vgg)")
    g.add_argument("--plain", action="store_true", help="the slow reference path (PIL per image, written-out "
                   "attention, no cache), to check that the fast path computes the same thing")
    g.add_argument("--eval-batch-size", type=int, default=256, help="batch size for scoring (default: 256)")
    return p


def train_args(argv=None) -> argparse.Namespace:
    """Parse and check train.py's flags; recipe values left out stay None (train.py fills in the recipe's)."""
    p = train_parser()
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "lr", "image_size", "eval_batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.lam is not None and args.lam < 0:
        p.error(f"--lam must be >= 0, got {args.lam}")
    if args.knn_k < 0:
        p.error(f"--knn-k must be >= 0 (0 skips the kNN baseline), got {args.knn_k}")
    if args.limit is not None and args.limit < 2:
        p.error(f"--limit must be at least 2 (one normal and one anomalous test image), got {args.limit}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seed lists a seed twice ({' '.join(map(str, args.seeds))}): each seed is one run")
    if os.environ.get("HF_HUB_OFFLINE"):  # a teacher offline mode cannot reach: say so before the slow imports
        try:
            check_offline(args.teacher or DEFAULT_TEACHER[args.dataset][args.backbone], args.cache_dir)
        except CheckpointError as e:
            p.exit(2, f"error: {e}\n")
    return args


## --------------------------------------------------------------------------------------------------------
## evaluate.py

def evaluate_parser() -> OneLineParser:
    p = OneLineParser(prog="evaluate.py", description="Re-evaluate KDAD runs, or tabulate them.")
    p.add_argument("runs", nargs="+", help="run folder(s) written by train.py; a --cls all folder stands for the "
                                           "class runs inside it")
    p.add_argument("--table", action="store_true", help="print and write the per-class table of the runs")
    p.add_argument("--table-out", help="path prefix of the table's .md, .csv and .png (default: 'table' beside the "
                                       "runs: inside a single folder given, else in the runs' common parent)")
    p.add_argument("--plots", action="store_true", help="write ROC, histogram, anomaly-map and training-curve PNGs "
                                                        "into the run folder (needs matplotlib)")
    p.add_argument("--maps", choices=["mismatch", "gradient"], default="mismatch",
                   help="anomaly maps: student/teacher mismatch per location (default), or the paper's gradient "
                        "of the score with respect to the pixels, smoothed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: the run's own precision")
    p.add_argument("--batch-size", type=int, default=256, help="scoring batch size (default: 256)")
    return p


def evaluate_args(argv=None) -> argparse.Namespace:
    p = evaluate_parser()
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.plots and importlib.util.find_spec("matplotlib") is None:  # found without importing it
        p.exit(2, f"error: {NO_MATPLOTLIB}\n")
    return args


## --------------------------------------------------------------------------------------------------------
## bench.py

def bench_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="bench.py",
                      description="Fast path vs plain path, side by side; or the projected time of the whole table.")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--batch-size", type=int, help="default: 128 on a GPU, 16 on the CPU")
    p.add_argument("--steps", type=int, help="timed steps per measurement (default: 20 on a GPU, 3 on the CPU)")
    p.add_argument("--image-size", type=int, default=224, help="crop size (default: 224, the recipes')")
    p.add_argument("--backbones", nargs="+", default=["vit", "vgg"], choices=["vit", "vgg"])
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of the plain path (default: min(4, CPUs))")
    p.add_argument("--data-dir", help="image folder to take the images from (default: random images)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    p.add_argument("--full-class", action="store_true",
                   help="instead: train one whole class per recipe with train.py and report the wall time")
    p.add_argument("--table", action="store_true",
                   help="instead: project the wall time of the full ten-class table per recipe from measured speeds")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="process counts for --table's projection (default: 1 2 4 8)")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


## --------------------------------------------------------------------------------------------------------
## Device and precision, chosen once per process.

def pick_device(name: str | None, local_rank: int | None = None):
    """torch.device for --device: 'auto' (or None) is cuda when there is a GPU, else cpu. Under torchrun
    (local_rank given) 'auto' and 'cuda' mean this process's own GPU, cuda:LOCAL_RANK. Raises RunError for a
    device this machine does not have."""
    import torch
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
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


def bf16_supported(device) -> bool:
    """Native bf16 only: CUDA compute capability 8.0+ (Ampere on), or a CPU with AVX-512 BF16. Older GPUs
    (T4, V100) only emulate it, slower than fp32."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    is_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return device.type == "cpu" and bool(is_bf16())


def pick_precision(name: str, device) -> str:
    """'auto' is bf16 where the hardware has it (CUDA, CPUs with AVX-512 BF16), else fp32."""
    return ("bf16" if bf16_supported(device) else "fp32") if name == "auto" else name


def autocast(device, precision: str):
    """A factory of autocast contexts: bf16 compute with fp32 master weights, or plain fp32."""
    import torch
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


## --------------------------------------------------------------------------------------------------------
## Progress: tqdm's bar on a terminal; in a log file, one plain line per interval instead of carriage returns.

class _Lines:
    """A stream for tqdm that turns each redraw ('\\r' + bar) into one line of its own (for redirected output); a
    redraw the same as the line before (the last update, then the bar closing) is not written twice."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s and s != self.last:
            self.stream.write(s + "\n")
            self.last = s

    def flush(self):
        self.stream.flush()


def progress(iterable, total: int, desc: str, interval: float = 30.0, initial: int = 0):
    """Wrap an iterable in a tqdm bar on stderr (count, rate, elapsed and time left); the count starts at
    `initial` (the steps a resumed epoch had done) and goes to `total`. On a terminal the bar redraws in place and
    is cleared at the end; when stderr is not a terminal a line is written at most every `interval` seconds
    (nothing for a loop that ends sooner), and one at the end. Use it as a context manager so the bar is closed
    before any message that follows (a Ctrl-C or error line then starts on a line of its own)."""
    from tqdm import tqdm
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                    unit="batch", initial=initial)
    return tqdm(iterable, total=total, desc=desc, file=_Lines(sys.stderr), mininterval=interval, delay=interval,
                ncols=100, ascii=True, unit="batch", initial=initial)
