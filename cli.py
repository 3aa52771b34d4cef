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
import math
import os
import signal
import sys
from contextlib import nullcontext

from checkpoint import CheckpointError
from hub import DEFAULT_TEACHER, PRESETS, check_offline


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
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]


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
    g.add_argument("--teacher-mean", type=number, nargs=3, metavar=("R", "G", "B"),
                   help="input mean the teacher expects (default: its checkpoint family's)")
    g.add_argument("--teacher-std", type=number, nargs=3, metavar=("R", "G", "B"),
                   help="input std the teacher expects (default: its checkpoint family's)")
    g.add_argument("--teacher-heads", type=int, metavar="N",
                   help="attention heads of a ViT teacher whose folder does not say (no config.json beside a bare "
                        "timm or torchvision file; default: 64 dimensions per head, as the teacher: line says)")
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
    g.add_argument("--lr", type=number, help="vgg 1e-3 (Adam), vit 5e-5 (AdamW, x0.2 after epoch 5; MVTec AD after 25)")
    g.add_argument("--lam", type=number, help="weight of the MSE (value) term (0.01; MVTec AD 0.5)")
    g.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="seeds the split, the student and the batches (default: 0); several seeds run one job each")
    g.add_argument("--select", choices=["final", "val-auroc"], default="final",
                   help="model selection: the final epoch (default), or the best validation AUROC, which uses "
                        "anomaly labels of the validation images (recorded in results.json)")
    g.add_argument("--knn-k", type=int, default=2,
                   help="neighbours of the teacher-alone kNN baseline scored beside KDAD (default: 2; 0 skips it)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default: runs/<backbone>-<teacher>[-<data folder>]-<class>-s<seed>, "
                                 "plus every setting that changes the result and is not the recipe's, e.g. -32px-"
                                 "limit300-1ep-batch16; with several seeds, OUT/s<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast in bf16 or fp16 (with loss scaling) over fp32 weights, or fp32 throughout "
                        "(default: bf16 on GPUs of compute capability 8.0+ and AVX-512 BF16 CPUs, fp16 on older "
                        "GPUs such as T4 and V100, fp32 on other CPUs)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (slower on a GPU): the same command then gives the same weights "
                        "run after run on the same GPU; the CPU is deterministic without it")
    g.add_argument("--compile", action="store_true", help="torch.compile teacher and student")
    g.add_argument("--no-cache", action="store_true", help="recompute the teacher's features every epoch (the "
                   "recipes without augmentation: vgg, and vit on MVTec AD)")
    g.add_argument("--plain", action="store_true", help="the slow reference path (PIL per image, written-out "
                   "attention, no cache), to check that the fast path computes the same thing")
    g.add_argument("--eval-batch-size", type=int, default=256, help="batch size for scoring (default: 256)")
    return p


def number(text: str) -> float:
    """argparse type of every real-valued flag: a finite number (nan and inf are refused as the flag's error)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


SEED_MAX = 2**32 - 1  # numpy's seeds are unsigned 32-bit words; torch's take the same values


def train_args(argv=None) -> argparse.Namespace:
    """Parse and check train.py's flags; recipe values left out stay None (train.py fills in the recipe's)."""
    p = train_parser()
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "lr", "image_size", "eval_batch_size", "teacher_heads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.lam is not None and args.lam < 0:
        p.error(f"--lam must be >= 0, got {args.lam}")
    if args.teacher_std and min(args.teacher_std) <= 0:
        std = " ".join(map(str, args.teacher_std))
        p.error(f"--teacher-std must be positive (inputs are divided by it), got {std}")
    if any(not 0 <= s <= SEED_MAX for s in args.seeds):
        p.error(f"--seed must be between 0 and {SEED_MAX}, got {' '.join(map(str, args.seeds))}")
    if args.knn_k < 0:
        p.error(f"--knn-k must be >= 0 (0 skips the kNN baseline), got {args.knn_k}")
    if args.limit is not None and args.limit < 2:
        p.error(f"--limit must be at least 2 (one normal and one anomalous test image), got {args.limit}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.teacher_heads and args.backbone != "vit":
        p.error("--teacher-heads is for a ViT teacher (--backbone vit)")
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
    p.add_argument("--precision", choices=PRECISIONS[1:], help="default: the run's own precision")
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
    p.add_argument("--grad-scale", action="store_true",
                   help="instead: measure the ViT student's gradient magnitudes in fp32 and what fp16 would flush to "
                        "zero at each loss scale (how train.py's fp16 loss-scaler settings were chosen)")
    p.add_argument("--teacher", help="--grad-scale: a ViT teacher .safetensors (default: random ViT-B/16 weights)")
    p.add_argument("--flops", action="store_true",
                   help="instead: count the floating-point operations per image and per CIFAR-10 class of each recipe")
    p.add_argument("--check", action="store_true",
                   help="instead: check what the tests cannot (bf16/fp16 training, the cache on the device and in "
                        "host memory, torchrun sharing one device, torch.compile, a repeated run) and print one "
                        "table; recipe sizes on a GPU, toy sizes on the CPU")
    p.add_argument("--skip", nargs="+", choices=["compile", "torchrun"], help="--check: leave these steps out")
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


## --------------------------------------------------------------------------------------------------------
## Device and precision, chosen once per process.

def pick_device(name: str | None, local_rank: int | None = None):
    """torch.device for --device: 'auto' (or None) is cuda when there is a GPU, else cpu. Under torchrun with
    several processes (local_rank given) 'cuda' is this process's own GPU (torchrun_gpu). Raises RunError for a
    device this machine does not have."""
    import torch
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise RunError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} but this machine has no usable CUDA GPU: use --device cpu")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device(torchrun_gpu(name, local_rank, torch.cuda.device_count()))
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RunError(f"--device {name} but this machine has {torch.cuda.device_count()} GPU(s): use cuda:0 .. "
                       f"cuda:{torch.cuda.device_count() - 1}")
    return device


def torchrun_gpu(name: str, local_rank: int, count: int) -> str:
    """The GPU of one of several torchrun processes that sees `count` GPUs: cuda:LOCAL_RANK, or cuda:0 where it
    sees one (SLURM's --gpus-per-task shows each process its own GPU as cuda:0; on a one-GPU machine the processes
    share it). RunError for --device cuda:N (every process would take GPU N) and for more processes than GPUs."""
    if name != "cuda":
        raise RunError(f"--device {name} under torchrun would put every process on that one GPU: use --device cuda "
                       f"(or leave it out): each process then takes its own, cuda:LOCAL_RANK")
    if count == 1:
        return "cuda:0"
    if local_rank >= count:
        raise RunError(f"process {local_rank} of this machine has no GPU of its own ({count} GPUs here): start at "
                       f"most {count} processes per machine (torchrun --nproc-per-node {count})")
    return f"cuda:{local_rank}"


def native_precision(kind: str, capability: tuple | None = None, cpu_bf16: bool = False) -> str:
    """What `--precision auto` picks for a device of `kind` ('cuda' or 'cpu'): bf16 where the hardware computes it
    natively (CUDA compute capability 8.0+, Ampere on; CPUs with AVX-512 BF16); fp16 on older CUDA GPUs (T4 7.5,
    V100 7.0), which have fp16 tensor cores but only emulate bf16, slower than fp32; fp32 on other CPUs (bf16 and
    fp16 are emulated there too)."""
    if kind == "cuda":
        return "bf16" if capability >= (8, 0) else "fp16"
    return "bf16" if cpu_bf16 else "fp32"


def choose_precision(name: str, kind: str, capability: tuple | None = None, cpu_bf16: bool = False) -> str:
    """--precision for a device (see native_precision); RunError for bf16 on a GPU that only emulates it."""
    native = native_precision(kind, capability, cpu_bf16)
    if name == "auto":
        return native
    if name == "bf16" and kind == "cuda" and native != "bf16":
        raise RunError(f"--precision bf16 on a GPU of compute capability {capability[0]}.{capability[1]} (below 8.0) "
                       f"runs emulated, slower than fp32: use --precision fp16 (what auto picks there) or fp32")
    return name


def pick_precision(name: str, device) -> str:
    """--precision for this device (choose_precision with what torch reports about it)."""
    import torch
    if device.type == "cuda":
        return choose_precision(name, "cuda", torch.cuda.get_device_capability(device))
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    fp16 = bool(getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)())
    chosen = choose_precision(name, "cpu", cpu_bf16=bf16)
    if not {"bf16": bf16, "fp16": fp16}.get(chosen, True):  # asked for; auto never picks an emulated one
        auto = native_precision("cpu", None, bf16)
        note(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no {chosen} arithmetic of its own: "
             f"--precision {chosen} runs emulated, several times slower (auto picks {auto} here)")
    return chosen


def autocast(device, precision: str):
    """A factory of autocast contexts: bf16 or fp16 compute with fp32 master weights, or plain fp32."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


## fp16 loss scaling (torch.amp.GradScaler), chosen from `bench.py --grad-scale` (docs/speed.md, "fp16"). The loss
## is a mean over batch x tokens x width elements, so the gradients reaching the students' layers are tiny: median
## 2^-26 for the ViT recipe (batch 128, 224 px), 2^-21 for VGG (batch 64); unscaled, fp16 flushes 57% of the ViT's
## to zero. 2^17 leaves none flushed (under 0.01%), and keeps the largest gradient measured (9.1e-2, VGG's first
## step; DINOv2 ViT-S/14 5.7e-2) at 11,900, 5.5 times below fp16's 65,504. Growing it every 100 good steps instead
## of PyTorch's 2,000 lets it grow three times in the ViT recipe's 360 steps, at most one skipped step each.
GRAD_SCALE = {"init_scale": 2.0**17, "growth_interval": 100}


def grad_scaler(device, precision: str):
    """The loss scaler of a training run: active for fp16 only (bf16 has fp32's exponent range, fp32 needs none);
    a disabled scaler passes scale/step/update straight through, so the training step reads the same."""
    import torch
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16", **GRAD_SCALE)


def set_numerics(precision: str, deterministic: bool = False):
    """Process-wide numerics, set once per process (every flag, both ways, so nothing carries over):
    - TF32 (Ampere+ GPUs) for what stays fp32 under bf16/fp16 autocast; IEEE fp32 under --precision fp32 (cuDNN's
      convolutions otherwise default to TF32, so fp32 would not be fp32);
    - cudnn.benchmark: the recipes' shapes are fixed, so timing the convolution algorithms once pays; off when
      deterministic, since the fastest algorithm found can differ from run to run;
    - deterministic: torch.use_deterministic_algorithms (warning, not failing, at an operation without a
      deterministic kernel), cudnn.deterministic, and the cuBLAS workspace setting that makes its matmuls
      repeatable (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts: call this before the first GPU matmul)."""
    import torch
    tf32 = precision != "fp32"
    # the allow_tf32 flags, not torch 2.9's fp32_precision ones: mixing the two makes torch refuse
    # get_float32_matmul_precision(), which Inductor (--compile) calls
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


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


def progress(iterable, total: int, desc: str, interval: float = 30.0, unit: str = "batch", initial: int = 0):
    """Wrap an iterable in a tqdm bar on stderr (count, rate, elapsed and time left); the count starts at
    `initial` (the steps a resumed epoch had done) and goes to `total`. On a terminal the bar redraws in place and
    is cleared at the end; when stderr is not a terminal a line is written at most every `interval` seconds
    (nothing for a loop that ends sooner), and one at the end. Use it as a context manager so the bar is closed
    before any message that follows (a Ctrl-C or error line then starts on a line of its own). With iterable None
    the caller counts: bar.update(n)."""
    from tqdm import tqdm
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                    unit=unit, initial=initial)
    return tqdm(iterable, total=total, desc=desc, file=_Lines(sys.stderr), mininterval=interval, delay=interval,
                ncols=100, ascii=True, unit=unit, initial=initial)
