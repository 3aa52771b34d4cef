"""`python bench.py --check`: on whatever device it finds, the steps the test suite cannot take on a CPU-only
machine, in one table: bf16 and fp16 (with loss scaling) training of both recipes beside fp32, the VGG feature
cache on the device and in host memory, scoring at the recipe's batch size, torchrun with two processes sharing one
device, torch.compile, and a short run repeated (is it the same run?). Random-weight teachers and generated images:
no network.

    python bench.py --check                   # a GPU: the recipes' networks at 224 px, the recipes' batch sizes
    python bench.py --check --device cpu      # the same steps at toy sizes (the test suite runs this)

Sizes: on a GPU, ViT-B/16 and VGG16 at 224 px, batch 128 / 64, 20 timed steps, scoring 512 images at 256; about
5-10 minutes on one modern GPU (estimated: not yet run on a GPU). On the CPU, a 4-block ViT of width 64 and a thin
VGG with VGG16's widths at the tapped pools, at 32 px, batch 4, 2 timed steps: a check that every path runs and
agrees, not a speed measurement (bench.py measures the CPU). torch.compile uses Inductor on a GPU; on the CPU the
eager backend unless --compile is given (Inductor compiles C++ with the system's compiler there: minutes).
"""
import os
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import bench
from cache import feature_cache
from checkpoint import save_tensors
from cli import autocast, grad_scaler, pick_precision, set_numerics
from data import Preprocess, batches
from distill import KDAD, channels_last, make_student, place, taps_for
from evaluate import auroc, score_images
from train import RECIPES, train_step
from vgg import VGG, VGGConfig
from vit import ViT, ViTConfig

ROOT = Path(__file__).resolve().parent


@dataclass
class Sizes:
    image_size: int
    vit: ViTConfig            # the teachers' architectures (random weights)
    vgg: VGGConfig
    batch: dict               # training batch per backbone
    steps: int                # timed training steps (after warm_up)
    eval_batch: int
    score_images: int
    run_images: int           # training images of the short runs (determinism, torchrun)
    run_batch: int
    warm_up: int = 2          # untimed steps first (kernel choice, allocator, compiling)


GPU = Sizes(224, ViTConfig(image_size=224), VGGConfig(), {"vit": 128, "vgg": 64}, 20, 256, 512, 256, 128)
TOY = Sizes(32, ViTConfig(image_size=32, patch_size=8, width=64, depth=4, heads=2, mlp_width=128),
            VGGConfig(widths=[8, "M", 128, "M", 256, "M", 512, "M", 512, "M"]),  # VGG16's widths where KDAD taps
            {"vit": 4, "vgg": 4}, 1, 8, 8, 16, 4, warm_up=1)


## --------------------------------------------------------------------------------------------------------
## Measuring: host syncs, peak memory, time.

@contextmanager
def host_reads(device, counts: dict):
    """Counts what makes the host wait for the device inside the block, in counts["n"]. On a GPU: CUDA's own
    count (torch.cuda.set_sync_debug_mode warns at every synchronising call). On the CPU nothing waits, so the
    calls that would wait on a GPU are counted instead: Tensor.item/tolist/cpu/numpy and bool/int/float of a
    tensor, made from this project's files (torch's own, such as the optimiser reading its step count from a CPU
    tensor, are left out)."""
    counts["n"] = 0
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts["n"] = sum("synchroniz" in str(w.message) for w in caught)
        return
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
    real = {name: getattr(torch.Tensor, name) for name in names}

    def counted(name):
        def call(self, *args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if caller.parent in (ROOT, ROOT / "tests"):
                counts["n"] += 1
            return real[name](self, *args, **kwargs)
        return call
    for name in names:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name in names:
            setattr(torch.Tensor, name, real[name])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


## --------------------------------------------------------------------------------------------------------
## Inputs: random-weight teachers, generated images (normal: one mean colour; anomalous: another).

def teacher(backbone: str, s: Sizes):
    torch.manual_seed(0)
    return (ViT(s.vit) if backbone == "vit" else VGG(s.vgg)).requires_grad_(False).eval()


def images(n: int, anomalous: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = 170.0 if anomalous else 80.0
    return (torch.randn(n, 3, 32, 32, generator=g) * 40 + mean).clamp(0, 255).to(torch.uint8)


def image_folder(root: Path, classes=("c0", "c1"), n_train=40, n_test=12) -> Path:
    """root/{train,test}/<class>/NNN.png, each class its own mean colour."""
    from PIL import Image
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images(n, c == 1, seed=100 * c + (split == "test"))):
                Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return root


## --------------------------------------------------------------------------------------------------------
## One recipe in one precision: training and scoring speed, memory, syncs, loss scaling, scoring agreement.

def recipe_row(backbone: str, precision: str, device, s: Sizes, host_cache=False) -> dict:
    set_numerics(precision)
    t = place(teacher(backbone, s), device, backbone)
    torch.manual_seed(0)
    student = place(make_student(backbone, t), device, backbone)
    kdad = KDAD(t, student, taps_for(backbone, t))
    prep = Preprocess(s.image_size, t.cfg.mean, t.cfg.std, device, channels_last(backbone))
    recipe, bs = RECIPES["cifar10"][backbone], s.batch[backbone]
    opt = recipe["optimizer"](student.parameters(), lr=recipe["lr"], fused=device.type == "cuda")
    amp, scaler = autocast(device, precision), grad_scaler(device, precision)
    n = bs * (s.warm_up + 2 * s.steps)
    train = images(n, False, seed=1).to(device)
    order = torch.arange(n, device=device)
    aug = (prep.random_augment(n, torch.Generator().manual_seed(0)) if recipe["augment"] else prep.center(n))
    row = {"check": "train + score" + (" (cache in host memory)" if host_cache else ""), "recipe": backbone,
           "precision": precision}
    cache, notes = None, []
    with bench.peak_memory(device, mem := {}):
        if not recipe["augment"]:
            real_free = torch.cuda.mem_get_info if device.type == "cuda" else None
            if host_cache:  # as if the GPU were full: the fallback to host memory
                torch.cuda.mem_get_info = lambda *_: (0, real_free(device)[1])
            try:
                cache = feature_cache(kdad, train, prep, amp, s.eval_batch, device, bs)
            finally:
                if host_cache:
                    torch.cuda.mem_get_info = real_free
            dtypes = "/".join(sorted({str(c.dtype)[6:] for c in cache.tensors})) if cache else ""
            notes.append("cache " + ("none" if cache is None else f"in host memory, {dtypes}" if cache.on_host else
                                     f"on {device.type}, {dtypes}"))
        steps = iter(batches(train, order, aug.to(device), bs, prep))
        student.train()
        for _ in range(s.warm_up):
            train_step(kdad, opt, amp, scaler, *next(steps), cache)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(s.steps):
            loss = train_step(kdad, opt, amp, scaler, *next(steps), cache)
        sync(device)
        row["train"] = s.steps * bs / (time.perf_counter() - t0)
        with host_reads(device, reads := {}):
            for _ in range(s.steps):
                train_step(kdad, opt, amp, scaler, *next(steps), cache)
            sync(device)
        row["syncs"] = reads["n"] / s.steps
    if not torch.isfinite(loss):
        notes.append("loss not finite")
    if scaler.is_enabled():  # the optimiser counts the steps it took; the scaler skips those that overflowed
        taken = int(opt.state[next(iter(student.parameters()))]["step"])
        notes.append(f"loss scale 2^{int(np.log2(scaler.get_scale()))}, {s.warm_up + 2 * s.steps - taken} of "
                     f"{s.warm_up + 2 * s.steps} steps skipped")
    del cache, steps, train
    row |= scoring(kdad, prep, amp, device, s, precision)
    row["peak_mib"] = max(mem["peak_mib"], row["peak_mib"])
    row["ok"] = "loss not finite" not in notes and not row["score_notes"] and row.get("agree", 1.0) > 0.99
    row["notes"] = "; ".join(notes + row.pop("score_notes"))
    row["minutes"] = bench.class_seconds(backbone, row["train"], row["score"]) / 60
    return row


def scoring(kdad, prep, amp, device, s: Sizes, precision) -> dict:
    """Score s.score_images generated test images (half anomalous) at the recipe's scoring batch; outside fp32,
    the same student scored in fp32 too: AUROC difference and rank agreement (Spearman)."""
    from scipy.stats import spearmanr
    half = s.score_images // 2
    test = torch.cat([images(half, False, seed=2), images(half, True, seed=3)]).to(device)
    labels = np.array([0] * half + [1] * half)
    score_images(kdad, test[:s.eval_batch], prep, amp, s.eval_batch)  # warm-up
    out = {}
    with bench.peak_memory(device, mem := {}):
        sync(device)
        t0 = time.perf_counter()
        scores = score_images(kdad, test, prep, amp, s.eval_batch)
        sync(device)
        out["score"] = len(test) / (time.perf_counter() - t0)
    out["peak_mib"] = mem["peak_mib"]
    out["score_notes"] = [] if torch.isfinite(scores).all() else ["scores not finite"]
    if precision != "fp32":
        ref = score_images(kdad, test, prep, autocast(device, "fp32"), s.eval_batch)
        out["agree"] = float(spearmanr(scores.numpy(), ref.numpy())[0])
        out["auroc_diff"] = abs(auroc(scores, labels) - auroc(ref, labels))
    return out


## --------------------------------------------------------------------------------------------------------
## Whole runs through train.py: compiled, repeated, and under torchrun.

def teacher_files(tmp: Path, s: Sizes) -> dict:
    files = {"vit": tmp / "vit.safetensors"}  # the runs below train the ViT recipe
    save_tensors(teacher("vit", s).state_dict(), files["vit"])
    return files


def run_argv(files, data, out, s: Sizes, *extra) -> list[str]:
    return ["--backbone", "vit", "--cls", "c0", "--teacher", str(files["vit"]), "--data-dir", str(data),
            "--image-size", str(s.image_size), "--epochs", "1", "--limit", str(s.run_images), "--batch-size",
            str(s.run_batch), "--eval-batch-size", str(s.eval_batch), "--knn-k", "0", "--out", str(out), *extra]


def quietly(argv, log: Path) -> int:
    """train.main(argv) with its output into `log` (the check prints one table)."""
    import contextlib

    import train
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return train.main(argv)


def repeated_row(device, files, data, tmp: Path, s: Sizes, deterministic: bool) -> dict:
    """The same short run twice: bitwise the same student?"""
    from checkpoint import read_tensors
    extra = ["--device", str(device), "--precision", "auto"] + (["--deterministic"] if deterministic else [])
    tag = "-det" if deterministic else ""
    rcs = [quietly(run_argv(files, data, tmp / f"again{tag}{k}", s, *extra), tmp / "log.txt") for k in (1, 2)]
    row = {"check": "short run repeated" + (" (--deterministic)" if deterministic else ""), "recipe": "vit",
           "precision": pick_precision("auto", device)}
    if any(rcs):
        return row | {"ok": False, "notes": f"train.py exit codes {rcs}"}
    a, b = (read_tensors(tmp / f"again{tag}{k}" / "student.safetensors") for k in (1, 2))
    same = all(torch.equal(a[k], b[k]) for k in a)
    row["notes"] = "the same weights, bit for bit" if same else "weights differ (not bitwise repeatable here)"
    row["ok"] = same or (device.type == "cuda" and not deterministic)  # a GPU repeats bitwise only when asked
    return row


def compile_row(device, s: Sizes, inductor: bool) -> dict:
    """The ViT recipe's training step compiled (Inductor; the eager backend checks only the wrapping)."""
    precision = pick_precision("auto", device)
    set_numerics(precision)
    t = place(teacher("vit", s), device, "vit")
    torch.manual_seed(0)
    student = place(make_student("vit", t), device, "vit").train()
    backend = "inductor" if inductor else "eager"
    kdad = KDAD(torch.compile(t, backend=backend), torch.compile(student, backend=backend), taps_for("vit", t))
    prep = Preprocess(s.image_size, t.cfg.mean, t.cfg.std, device)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, fused=device.type == "cuda")
    amp, scaler, bs = autocast(device, precision), grad_scaler(device, precision), s.batch["vit"]
    n = bs * (s.warm_up + s.steps)
    steps = iter(batches(images(n, False, 1).to(device), torch.arange(n, device=device),
                         prep.random_augment(n, torch.Generator().manual_seed(0)).to(device), bs, prep))
    t0 = time.perf_counter()
    for _ in range(s.warm_up):
        train_step(kdad, opt, amp, scaler, *next(steps))
    sync(device)
    compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
    for _ in range(s.steps):
        loss = train_step(kdad, opt, amp, scaler, *next(steps))
    sync(device)
    return {"check": f"torch.compile ({backend})", "recipe": "vit", "precision": precision,
            "train": s.steps * bs / (time.perf_counter() - t0), "ok": bool(torch.isfinite(loss)),
            "notes": f"first {s.warm_up} steps (compiling) {compile_s:.0f} s"}


def torchrun_row(device, files, data, tmp: Path, s: Sizes) -> dict:
    """train.py under torchrun, two processes on this one device (on a GPU: --device cuda with only this GPU
    visible, so both processes take cuda:0), --cls all: both classes finished and one table."""
    out, scratch = tmp / "torchrun", tmp / "scratch"  # scratch: torchrun's own torchelastic_* folders, removed
    scratch.mkdir()
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch)}
    if device.type == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = str(device.index or 0)
    argv = run_argv(files, data, out, s, "--device", device.type)
    argv[argv.index("--cls") + 1] = "all"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    finished = len(list(out.glob("*/results.json")))
    ok = proc.returncode == 0 and finished == 2 and (out / "table.md").is_file()
    last = (proc.stderr.strip().splitlines() or [""])[-1][:100]
    return {"check": "torchrun, 2 processes on 1 device", "recipe": "vit", "precision": "auto", "ok": ok,
            "notes": f"{finished} of 2 runs, table {'written' if (out / 'table.md').is_file() else 'missing'}, "
                     f"{time.perf_counter() - t0:.0f} s" + ("" if ok else f"; exit {proc.returncode}: {last}")}


## --------------------------------------------------------------------------------------------------------
## The table.

def precisions(device) -> list[str]:
    """What to compare: every precision this device runs natively, and fp32; on a CPU all three."""
    if device.type != "cuda":
        return ["fp32", "bf16", "fp16"]
    native = pick_precision("auto", device)
    return [native, "fp16", "fp32"] if native == "bf16" else ["fp16", "fp32"]


def check(args, device) -> int:
    """Every check; prints one table and returns 0 when all passed, else 1."""
    s = GPU if device.type == "cuda" else TOY
    skip = set(args.skip or [])
    rows = []
    print(f"device: {bench.describe_device(device)}; torch {torch.__version__}; "
          + ("recipe sizes" if s is GPU else "toy sizes (a check that every path runs, not a speed measurement)"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for backbone in ("vit", "vgg"):
            for precision in precisions(device):
                rows.append(guarded(recipe_row, backbone, precision, device, s))
        if device.type == "cuda":
            rows.append(guarded(recipe_row, "vgg", pick_precision("auto", device), device, s, host_cache=True))
        files, data = teacher_files(tmp, s), image_folder(tmp / "data", n_train=s.run_images + 8)
        for deterministic in ([False, True] if device.type == "cuda" else [False]):
            rows.append(guarded(repeated_row, device, files, data, tmp, s, deterministic))
        if "compile" not in skip:
            rows.append(guarded(compile_row, device, s, device.type == "cuda" or args.compile))
        if "torchrun" not in skip:
            rows.append(guarded(torchrun_row, device, files, data, tmp, s))
    print_rows(rows, s)
    return 0 if all(r.get("ok") for r in rows) else 1


def guarded(fn, *a, **kw) -> dict:
    """A check that raises is a failed row with the error's first line, and the others still run."""
    try:
        return fn(*a, **kw)
    except Exception as e:
        return {"check": fn.__name__.replace("_row", ""), "recipe": a[0] if isinstance(a[0], str) else "-",
                "ok": False, "notes": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}


def print_rows(rows: list[dict], s: Sizes):
    def f(r, key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"
    print("\n| check | recipe | precision | train img/s | score img/s | peak MiB | syncs per step | min per class "
          "| min for ten | scoring vs fp32: Spearman, AUROC diff | result | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        agree = f"{r['agree']:.6f}, {r['auroc_diff']:.4f}" if "agree" in r else "-"
        ten = f"{10 * r['minutes']:.0f}" if r.get("minutes") is not None else "-"
        print(f"| {r['check']} | {r.get('recipe', '-')} | {r.get('precision', '-')} | {f(r, 'train', '.1f')} | "
              f"{f(r, 'score', '.1f')} | {f(r, 'peak_mib', '.0f')} | {f(r, 'syncs', '.2f')} | {f(r, 'minutes', '.1f')} "
              f"| {ten} | {agree} | {'ok' if r.get('ok') else 'FAILED'} | {r.get('notes', '')} |")
    print(f"\nTraining: batch {s.batch['vit']} (vit) / {s.batch['vgg']} (vgg), {s.steps} timed steps after "
          f"{s.warm_up}; "
          f"scoring {s.score_images} images at {s.eval_batch}; {s.image_size} px. Syncs: per train_step (the "
          f"training loop adds one every 10 steps for the progress bar and one every 50 for the NaN check). "
          f"Minutes: one CIFAR-10 class and ten, projected from these speeds"
          + (" (toy sizes: not the recipe's)." if s is TOY else "."))
