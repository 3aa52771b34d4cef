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
    python bench.py --grad-scale --device cpu --batch-size 128 --steps 3  # fp16: how small the gradients are
    python bench.py --flops                                              # the arithmetic behind GPU estimates
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
        recipe = RECIPES["cifar10"][backbone]
        seconds = class_seconds(backbone, row["train"], row["score"], row.get("cache_s", 0) / n)
        tens = " | ".join(f"{-(-10 // p) * seconds / 60:.0f} min" for p in args.processes)
        print(f"| {backbone} ({recipe['epochs']} epochs, batch {recipe['batch_size']}) | {row['train']:.1f} | "
              f"{row['score']:.1f} | {seconds / 60:.1f} | {tens} |")
    if device.type == "cpu":
        print("\nOn the CPU the processes would share these cores: the N-process columns assume one device each.")


## --------------------------------------------------------------------------------------------------------
## How small the ViT student's gradients are: what fp16 (smallest normal 2^-14, smallest subnormal 2^-24, largest
## 65504) would do to them at each loss scale. Measured in fp32: the values fp16 would have to hold.

FP16_MIN_NORMAL, FP16_ZERO_BELOW, FP16_MAX = -14, -25, 65504  # |g| < 2^-25 rounds to 0 in fp16


def exponent_counts(t: torch.Tensor, lo=-90, hi=30) -> torch.Tensor:
    """Counts (hi - lo,) of the non-zero |t| by binary exponent e (2^e <= |t| < 2^(e+1)), e in [lo, hi)."""
    a = t.detach().abs().float().flatten()
    e = torch.frexp(a[a > 0]).exponent - 1  # frexp: a = m * 2^exp with 0.5 <= m < 1
    return torch.bincount((e.clamp(lo, hi - 1) - lo).long(), minlength=hi - lo)


def fp16_fates(counts: torch.Tensor, k: int, lo=-90) -> tuple[float, float]:
    """(share flushed to zero, share subnormal or zero) of the counted values once scaled by 2^k and stored in fp16."""
    e = torch.arange(len(counts)) + lo + k  # exponent after scaling
    total = counts.sum().item()
    return counts[e < FP16_ZERO_BELOW].sum().item() / total, counts[e < FP16_MIN_NORMAL].sum().item() / total


def grad_scale(args, device):
    """Train the recipe's student (the first of --backbones) in fp32 for --steps steps and record, per step, the
    magnitudes of (a) the gradients of its Linear and conv parameters and (b) the gradients flowing into every
    Linear/conv output: what fp16 autocast computes in fp16 (LayerNorm, BatchNorm, position and CLS gradients stay
    fp32 there). Prints their quantiles and, per loss scale 2^k, what fp16 would flush to zero, leave subnormal,
    or overflow."""
    from distill import load_teacher
    backbone = args.backbones[0]
    recipe = RECIPES["cifar10"][backbone]
    teacher = (load_teacher(args.teacher, backbone, args.image_size) if args.teacher
               else random_teacher(backbone, args.image_size)).to(device)
    torch.manual_seed(0)
    student = make_student(backbone, teacher).to(device).train()
    kdad = KDAD(teacher, student, taps_for(backbone, teacher))
    prep = Preprocess(args.image_size, teacher.cfg.mean, teacher.cfg.std, device)
    opt = recipe["optimizer"](student.parameters(), lr=recipe["lr"])
    n, bs = args.batch_size * args.steps, args.batch_size
    images = bench_images(n, args.data_dir).to(device)
    g = torch.Generator().manual_seed(0)
    acts = []  # per step: exponent counts of the gradients reaching Linear/conv outputs

    def watch(module, _, out):
        out.register_hook(lambda grad: acts.append(exponent_counts(grad).cpu()))
    fp16_modules = [m for m in student.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    fp16_params = [p for m in fp16_modules for p in m.parameters()]  # their gradients are fp16 matmuls too
    hooks = [m.register_forward_hook(watch) for m in fp16_modules]
    print(f"device: {describe_device(device)}; torch {torch.__version__}; teacher "
          f"{args.teacher or 'random-weight ' + ('ViT-B/16' if backbone == 'vit' else 'VGG16')}; images "
          f"{args.data_dir or 'random'}; batch {bs}; {args.image_size} px; {backbone} recipe "
          f"({recipe['optimizer'].__name__} {recipe['lr']:g}" + (", random crop + flip" if recipe["augment"] else "")
          + "); fp32")
    print("\n| step | loss | param grads: median | 1% | 99% | max | activation grads: median | 1% | max |")
    print("|---|---|---|---|---|---|---|---|---|")
    params, activations, peaks = torch.zeros(120, dtype=torch.long), torch.zeros(120, dtype=torch.long), []
    aug = prep.random_augment(n, g) if recipe["augment"] else prep.center(n)
    for step, (_, x) in enumerate(batches(images, torch.randperm(n, generator=g), aug, bs, prep), start=1):
        acts.clear()
        loss = kdad.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in fp16_params]).abs()
        q = torch.quantile(grads[grads > 0][:2**24].double(), torch.tensor([0.5, 0.01, 0.99], dtype=torch.float64))
        params += exponent_counts(grads).cpu()
        step_acts = torch.stack(acts).sum(0)
        activations += step_acts
        a_med, a_lo, a_max = quantiles_of_counts(step_acts)
        peaks.append(max(grads.max().item(), 2.0 ** a_max))
        print(f"| {step} | {loss.item():.4f} | {q[0]:.2e} | {q[1]:.2e} | {q[2]:.2e} | {grads.max().item():.2e} | "
              f"2^{a_med} | 2^{a_lo} | 2^{a_max} |")
        opt.step()
    for h in hooks:
        h.remove()
    print("\nfp16 at loss scale 2^k: share of the non-zero gradients flushed to zero / left subnormal; overflow "
          "when the largest gradient times 2^k passes 65504")
    print("\n| scale | params: zero | params: subnormal | activations: zero | activations: subnormal | overflow |")
    print("|---|---|---|---|---|---|")
    for k in (0, 8, 12, 16, 17, 18, 20, 22, 24, 26):
        pz, ps = fp16_fates(params, k)
        az, as_ = fp16_fates(activations, k)
        over = max(peaks) * 2.0 ** k > FP16_MAX
        print(f"| 2^{k} | {100 * pz:.2f}% | {100 * ps:.2f}% | {100 * az:.2f}% | {100 * as_:.2f}% | "
              f"{'yes' if over else 'no'} |")


def quantiles_of_counts(counts: torch.Tensor, lo=-90) -> tuple[int, int, int]:
    """(median, 1st percentile, maximum) binary exponent of values counted by exponent_counts."""
    c = counts.cumsum(0) / counts.sum()
    nonzero = torch.nonzero(counts).flatten()
    return (int(torch.searchsorted(c, torch.tensor(0.5))) + lo, int(torch.searchsorted(c, torch.tensor(0.01))) + lo,
            int(nonzero[-1]) + lo)


def flops(args):
    """Floating-point operations (a multiply-add is 2) per image of each network at --image-size, counted by
    torch.utils.flop_counter on the real-size networks (the attention written out, so its matrix products are
    counted: the counter does not see inside the CPU's fused kernel), and per CIFAR-10 class of each recipe: its
    training, the per-epoch validation loss, the scoring and the teacher passes for the cache or the kNN bank."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9
    x = torch.randn(1, 3, args.image_size, args.image_size)
    g = {}
    for backbone in ("vit", "vgg"):
        teacher, student = random_teacher(backbone, args.image_size), None
        torch.manual_seed(0)
        student = make_student(backbone, teacher).train()
        for m in (teacher, student):
            set_fused_attn(m, False)
        with torch.no_grad():
            g[backbone, "teacher"] = count(lambda t=teacher: t(x))
            g[backbone, "student"] = count(lambda s=student: s(x))
        g[backbone, "train"] = count(lambda s=student: sum(h.float().sum() for h in s(x)).backward())
    print(f"GFLOP per image at {args.image_size} px (torch.utils.flop_counter; a multiply-add counts 2):\n")
    print("| recipe | teacher forward | student forward | student forward + backward |\n|---|---|---|---|")
    for backbone, name in (("vit", "ViT-B/16 + 4-block student"), ("vgg", "VGG16 + cloner")):
        print(f"| {name} | {g[backbone, 'teacher']:.2f} | {g[backbone, 'student']:.2f} | "
              f"{g[backbone, 'train']:.2f} |")
    split, pf = CIFAR10_SPLIT, 1e6  # GFLOP -> PFLOP
    print("\nPFLOP per CIFAR-10 class (4,500 training images; 500 normal of the 5,000 validation images; 10,000 "
          "test images):\n")
    print("| recipe | training | validation loss, all epochs | scoring val + test | teacher passes for the cache "
          "or kNN bank | total |\n|---|---|---|---|---|---|")
    for backbone, cached in (("vit", False), ("vgg", True), ("vgg", False)):
        r, t, s, tr = RECIPES["cifar10"][backbone], g[backbone, "teacher"], g[backbone, "student"], \
            g[backbone, "train"]
        val = split["val"] / 10
        parts = [r["epochs"] * split["train"] * (tr + (0 if cached else t)),
                 r["epochs"] * val * s + (val * t if cached else r["epochs"] * val * t),
                 (split["val"] + split["test"]) * (t + s), split["train"] * t]
        name = f"{backbone} ({r['epochs']} epochs)" + (", --no-cache" if backbone == "vgg" and not cached else "")
        print(f"| {name} | " + " | ".join(f"{p / pf:.2f}" for p in parts) + f" | {sum(parts) / pf:.2f} |")


def class_seconds(backbone: str, train_speed: float, score_speed: float, cache_s_per_image: float | None = None):
    """Seconds for one CIFAR-10 class of the recipe at these speeds (images/s): its epochs of 4,500 training images;
    scoring the 5,000 validation and 10,000 test images; per epoch, the loss on the 500 normal validation images
    (ViT: a teacher and student pass, at the scoring speed; VGG: the student alone on cached teacher features,
    counted at the training speed, an upper bound); for VGG the cache of the 4,500 + 500 images (at
    cache_s_per_image, else at the scoring speed), for the ViT the kNN bank (one teacher pass over the training
    images, at about the scoring speed)."""
    recipe, split = RECIPES["cifar10"][backbone], CIFAR10_SPLIT
    val_normal = split["val"] / 10
    seconds = recipe["epochs"] * split["train"] / train_speed + (split["val"] + split["test"]) / score_speed
    if recipe["augment"]:
        return seconds + (recipe["epochs"] * val_normal + split["train"]) / score_speed
    cached = split["train"] + val_normal
    return seconds + recipe["epochs"] * val_normal / train_speed + cached * (cache_s_per_image or 1 / score_speed)


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
    if args.check:
        import devicecheck
        return devicecheck.check(args, device)
    if args.flops:
        flops(args)
    elif args.grad_scale:
        grad_scale(args, device)
    elif args.table:
        table_projection(args, device)
    elif args.full_class:
        full_class(args, device)
    else:
        step_table(args, device)


if __name__ == "__main__":
    cli.ready_for_interrupts()
    sys.exit(main())
