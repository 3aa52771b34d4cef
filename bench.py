"""How much faster the fast path is than the plain one, measured side by side in one process on the same images.

fast  = what train.py does: uint8 images on the device, resize/crop/flip/normalise per batch there, bf16 autocast
        (where the hardware has it), SDPA attention, channels_last VGG, the VGG teacher's features cached once.
plain = what the reference code does: PIL transforms per image in DataLoader workers, fp32, written-out attention,
        the teacher recomputed at every step.

Both run the recipe's networks at 224 px (ViT-B/16 teacher + 4-block student; VGG16 + cloner) with random weights:
speed does not depend on the values of the weights. Figures are images per second over --steps timed steps after
one warm-up step; "train" covers everything a training step does, data preparation included.

    python bench.py                                  # both backbones, GPU if there is one
    python bench.py --device cpu --steps 3 --batch-size 16
    python bench.py --full-class --data-dir path/to/cifar10-jpeg          # wall time of one whole class per recipe
    python bench.py --table                                              # projected time of the ten-class table
"""
import sys

import cli

if __name__ == "__main__":  # flags first: --help and a mistyped flag answer before torch's 5-second import
    cli.bench_args(sys.argv[1:])
    cli.quiet_interrupt()

import platform  # the rest waits for the flag check above
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from cache import feature_cache
from cli import autocast, grad_scaler, pick_device, pick_precision, set_numerics
from data import Preprocess, batches
from distill import KDAD, make_student, taps_for
from folders import open_source
from train import RECIPES, train_step
from vgg import VGG
from vit import ViT, ViTConfig, set_fused_attn

## --------------------------------------------------------------------------------------------------------
## Measuring.

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device, out: dict):
    """Peak memory of the block in MiB: CUDA's allocator peak, or on the CPU the whole process's peak resident
    size (Linux VmHWM, reset through /proc/self/clear_refs; it includes the models and images already loaded)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: no figure rather than a wrong one
        yield
        out["peak_mib"] = float("nan")
        return
    yield
    with open("/proc/self/status") as f:
        out["peak_mib"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def timed(step, batch_iter, steps, device) -> float:
    """Images/s over `steps` calls of step(idx, x) after one warm-up call; fetching each batch is timed too."""
    it = iter(batch_iter)
    step(*next(it))
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        idx, x = next(it)
        step(idx, x)
        n += len(idx)
    sync(device)
    return n / (time.perf_counter() - t0)


## --------------------------------------------------------------------------------------------------------
## One backbone, both paths.

def random_teacher(backbone: str, image_size: int):
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=image_size)) if backbone == "vit" else VGG()
    return model.requires_grad_(False).eval()


def bench_path(backbone, fast: bool, images, device, args) -> dict:
    precision = pick_precision("auto", device) if fast else "fp32"
    set_numerics(precision)
    amp, scaler = autocast(device, precision), grad_scaler(device, precision)
    teacher = random_teacher(backbone, args.image_size).to(device)
    torch.manual_seed(0)
    student = make_student(backbone, teacher).to(device)
    channels_last = fast and backbone == "vgg"
    if channels_last:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    for m in (teacher, student):
        set_fused_attn(m, fast)
    kdad = KDAD(teacher, student, taps_for(backbone, teacher))
    if fast and args.compile:
        kdad.teacher, kdad.student = torch.compile(teacher), torch.compile(student)
    prep = Preprocess(args.image_size, teacher.cfg.mean, teacher.cfg.std, device, channels_last)
    recipe = RECIPES["cifar10"][backbone]
    opt = recipe["optimizer"](student.parameters(), lr=recipe["lr"], fused=fast and device.type == "cuda")
    n, bs = len(images), args.batch_size
    order = torch.arange(n, device=device)
    aug = (prep.random_augment(n, torch.Generator().manual_seed(0)) if recipe["augment"] else prep.center(n)).to(device)
    row = {"precision": precision}

    cache = None
    with peak_memory(device, mem := {}):
        if fast and not recipe["augment"]:  # the VGG recipe: build the cache once, outside the timed epoch
            t0 = time.perf_counter()
            cache = feature_cache(kdad, images, prep, amp, bs, device, bs)
            sync(device)
            row["cache_s"] = time.perf_counter() - t0
        student.train()
        row["train"] = timed(lambda idx, x: train_step(kdad, opt, amp, scaler, idx, x, cache),
                             batches(images, order, aug, bs, prep, plain=not fast, workers=args.workers),
                             args.steps, device)
    row["train_peak_mib"] = mem["peak_mib"]
    cache = None  # free it before scoring

    student.eval()
    with peak_memory(device, mem := {}), torch.inference_mode():
        def score(idx, x):
            with amp():
                kdad.score(x)
        row["score"] = timed(score, batches(images, order, prep.center(n).to(device), bs, prep, plain=not fast,
                                            workers=args.workers), args.steps, device)
    row["score_peak_mib"] = mem["peak_mib"]
    return row


def bench_images(n: int, data_dir) -> torch.Tensor:
    """n images (uint8, 32 px): the first training images of --data-dir, else random ones (the speed of the
    networks and the preprocessing does not depend on what the pixels show)."""
    if data_dir:
        source = open_source(data_dir, image_size=224)
        images, _ = source.images("train", torch.arange(n).numpy())
        return images
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def step_table(args, device):
    n = args.batch_size * (args.steps + 1)
    images = bench_images(n, args.data_dir).to(device)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; batch {args.batch_size}; "
          f"{args.image_size} px; "
          f"{args.steps} timed steps after 1 warm-up; plain path: {args.workers} DataLoader workers"
          + ("; fast path compiled" if args.compile else ""))
    print("\n| backbone | measure | fast | plain | fast / plain |\n|---|---|---|---|---|")
    for backbone in args.backbones:
        fast, plain = (bench_path(backbone, f, images, device, args) for f in (True, False))
        rows = [("train img/s" + (" (cache warm)" if "cache_s" in fast else ""), "train", "{:.1f}"),
                ("score img/s", "score", "{:.1f}"),
                ("train peak memory, MiB", "train_peak_mib", "{:.0f}"),
                ("score peak memory, MiB", "score_peak_mib", "{:.0f}")]
        for label, key, fmt in rows:
            ratio = fast[key] / plain[key] if plain[key] else float("nan")
            print(f"| {backbone} | {label} | {fmt.format(fast[key])} | {fmt.format(plain[key])} | {ratio:.2f}x |")
        if "cache_s" in fast:
            print(f"| {backbone} | feature cache build, s (once per run) | {fast['cache_s']:.1f} | - | - |")
        print(f"| {backbone} | precision | {fast['precision']} | {plain['precision']} | |")


## --------------------------------------------------------------------------------------------------------
## A whole class per recipe, through train.py, with random-weight teachers of the real architectures.

def full_class(args, device):
    import train
    from checkpoint import save_tensors
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            teacher_file = Path(tmp) / f"{backbone}.safetensors"
            save_tensors(random_teacher(backbone, 224).state_dict(), teacher_file)
            out = Path(tmp) / f"run-{backbone}"
            argv = ["--backbone", backbone, "--cls", "3", "--teacher", str(teacher_file), "--out", str(out),
                    "--device", str(device)] + (["--data-dir", args.data_dir] if args.data_dir else []) \
                + (["--compile"] if args.compile else [])
            t0 = time.perf_counter()
            assert train.main(argv) == 0, f"train.py failed for {backbone}"
            results[backbone] = time.perf_counter() - t0
    print("\n| recipe | one class, wall s | ten classes, projected min |\n|---|---|---|")
    for backbone, s in results.items():
        r = RECIPES["cifar10"][backbone]
        print(f"| {backbone} ({r['epochs']} epochs, batch {r['batch_size']}) | {s:.0f} | {10 * s / 60:.1f} |")


## --------------------------------------------------------------------------------------------------------
## The whole ten-class table, projected from measured speeds (issue: "the ten-class table in minutes").

CIFAR10_SPLIT = {"train": 4500, "val": 5000, "test": 10000}  # one class: 90% of its 5,000; 10% of all 50,000; all


def table_projection(args, device):
    """Project the wall time of the full ten-class table per recipe from the fast path's measured speeds:
    one class = epochs x 4,500 training images at the measured training speed, + the teacher-feature cache (VGG)
    and the kNN bank (ViT: one teacher pass), + scoring 5,000 validation and 10,000 test images, + one
    validation-loss pass over the 500 normal validation images per epoch. N processes (torchrun, one device
    each) take ceil(10 / N) classes each."""
    n = args.batch_size * (args.steps + 1)
    images = bench_images(n, args.data_dir).to(device)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; batch {args.batch_size}; "
          f"{args.image_size} px; {args.steps} timed steps after 1 warm-up (fast path)")
    rows = {backbone: bench_path(backbone, True, images, device, args) for backbone in args.backbones}
    header = " | ".join(f"{p} process{'es' if p > 1 else ''}" for p in args.processes)
    print(f"\n| recipe | train img/s | score img/s | one class, min | ten classes: {header} |")
    print("|---|---|---|---|" + "---|" * len(args.processes))
    for backbone, row in rows.items():
        recipe, split = RECIPES["cifar10"][backbone], CIFAR10_SPLIT
        seconds = (recipe["epochs"] * split["train"] / row["train"]
                   + (split["val"] + split["test"] + recipe["epochs"] * split["val"] / 10) / row["score"])
        if "cache_s" in row:  # built once per class
            seconds += row["cache_s"] / n * split["train"]
        else:                 # the kNN bank: one teacher pass, at about the scoring speed
            seconds += split["train"] / row["score"]
        tens = " | ".join(f"{-(-10 // p) * seconds / 60:.0f} min" for p in args.processes)
        print(f"| {backbone} ({recipe['epochs']} epochs, batch {recipe['batch_size']}) | {row['train']:.1f} | "
              f"{row['score']:.1f} | {seconds / 60:.1f} | {tens} |")
    if device.type == "cpu":
        print("\nOn the CPU the processes would share these cores: the N-process columns assume one device each.")


def describe_device(device) -> str:
    cpu = platform.processor() or platform.machine()
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu}, {torch.get_num_threads()} threads)"


def main(argv=None):
    args = cli.bench_args(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (128 if gpu else 16)
    args.steps = args.steps or (20 if gpu else 3)
    if args.table:
        table_projection(args, device)
    elif args.full_class:
        full_class(args, device)
    else:
        step_table(args, device)


if __name__ == "__main__":
    cli.ready_for_interrupts()
    main()
