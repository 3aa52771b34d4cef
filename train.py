"""Train a KDAD student on one normal class and report its test ROC AUC, once, at the end.

    python train.py --backbone vit --cls 3                      # the ViT reproduction's recipe, class 3 (cat)
    python train.py --backbone vgg --cls all                    # the paper's VGG16 recipe, ten classes + table
    python train.py --backbone vit --cls cat --teacher dino-vitb16 --data-dir ../shared/data/cifar10-jpeg
    python train.py --backbone vit --cls 3 --image-size 32 --epochs 1 --limit 300    # a quick CPU check

The recipes are shared/docs/method.md's; the protocol (validation held out from the training split, test scored
once, final epoch unless --select val-auroc) is data.py's. A run folder (--out) holds:
    config.json         every setting, the teacher's identity (sha256) and the code version
    state.pt            the resumable training state (written each epoch, on Ctrl-C, never half-written)
    log.jsonl           one line per epoch: loss, validation loss on normal images, images/s
    student.safetensors the chosen student, and results.json with val/test AUROC (at the end)
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from checkpoint import (DEFAULT_TEACHER, LABEL_FREE_VIT, PRESETS, CheckpointError, resolve_teacher, save_tensors,
                        sha256, write_atomically)
from data import DataError, Preprocess, batches, center, one_class_data, open_source, progress, random_augment
from distill import KDAD, channels_last, load_teacher, make_student, place, student_config_for, taps_for
from vit import set_fused_attn
from evaluate import (OneLineParser, RunError, auroc, autocast, load_student, pick_device, pick_precision,
                      read_json, score_images, write_table)

## The two recipes (method.md). The VGG one is the paper's code; the ViT one the reproduction's.
RECIPES = {
    "vgg": dict(epochs=200, batch_size=64, lr=1e-3, optimizer=torch.optim.Adam, milestones=[], gamma=1.0,
                augment=False),  # no augmentation: the teacher's features can be computed once and cached
    "vit": dict(epochs=10, batch_size=128, lr=5e-5, optimizer=torch.optim.AdamW, milestones=[5], gamma=0.2,
                augment=True),   # random crop + flip; AdamW with torch's default weight decay 0.01
}
RESULT_SETTINGS = ("backbone", "cls", "teacher_sha256", "teacher_mean", "teacher_std", "batch_size", "lr", "lam",
                   "image_size", "limit", "seed", "select", "precision", "plain", "data_dir",
                   "data_root")  # what a resumed run must share
USER_ERRORS = (CheckpointError, DataError, RunError)


class Stop(Exception):
    """Training ended early: Ctrl-C, or a non-finite loss. The message says what was kept."""


## --------------------------------------------------------------------------------------------------------
## Command line.

def parse_args(argv=None):
    p = OneLineParser(description="Multiresolution knowledge distillation for anomaly detection (KDAD).")
    g = p.add_argument_group("what to train")
    g.add_argument("--backbone", required=True, choices=["vgg", "vit"])
    g.add_argument("--cls", required=True, help="normal class: index 0-9, name (e.g. cat), or all")
    g.add_argument("--teacher", help=f"preset ({', '.join(PRESETS)}), http(s) address or .safetensors path "
                                     f"(default: {DEFAULT_TEACHER['vit']} for vit, {DEFAULT_TEACHER['vgg']} for vgg)")
    g.add_argument("--cache-dir", help="where presets are downloaded (default: $KDAD_CACHE or ~/.cache/kdad-vit)")
    g.add_argument("--teacher-mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="input mean the teacher expects (default: its checkpoint family's)")
    g.add_argument("--teacher-std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="input std the teacher expects (default: its checkpoint family's)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="image folder with train/<class>/ and test/<class>/ (default: CIFAR-10)")
    g.add_argument("--data-root", default="./data", help="where torchvision's CIFAR-10 is downloaded (default: ./data)")
    g.add_argument("--image-size", type=int, default=224, help="crop size; the resize keeps 256/224 (default: 224)")
    g.add_argument("--limit", type=int, help="at most N images per split, for quick runs (default: all)")
    g = p.add_argument_group("recipe (defaults: the paper's for vgg, the reproduction's for vit)")
    g.add_argument("--epochs", type=int, help="vgg 200, vit 10")
    g.add_argument("--batch-size", type=int, help="vgg 64, vit 128")
    g.add_argument("--lr", type=float, help="vgg 1e-3 (Adam), vit 5e-5 (AdamW, x0.2 after epoch 5)")
    g.add_argument("--lam", type=float, default=0.01, help="weight of the MSE (value) term (default: 0.01)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, the student and the batches (default: 0)")
    g.add_argument("--select", choices=["final", "val-auroc"], default="final",
                   help="model selection: the final epoch (default), or the best validation AUROC, which uses "
                        "anomaly labels of the validation images (recorded in results.json)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default: runs/<backbone>-<teacher>-<class>-s<seed>)")
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
    args = p.parse_args(argv)
    for name, value in RECIPES[args.backbone].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in ("epochs", "batch_size", "lr", "image_size", "eval_batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lam < 0:
        p.error(f"--lam must be >= 0, got {args.lam}")
    if args.limit is not None and args.limit < 2:
        p.error(f"--limit must be at least 2 (one normal and one anomalous test image), got {args.limit}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    return args


## --------------------------------------------------------------------------------------------------------
## Run folder: what it holds, and refusing to clobber an existing one.

def write_text(path: Path, text: str):
    write_atomically(path, lambda tmp: tmp.write_text(text))


def code_version() -> dict:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")):
        h.update(f.read_bytes())
    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    return {"git": git or None, "sources_sha256": h.hexdigest()[:16]}


def prepare_run_dir(run: Path, settings: dict, resume: bool, overwrite: bool) -> bool:
    """Refuse to reuse a run folder silently (a different configuration, a finished or an unfinished run);
    returns whether there is a saved state to continue from."""
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file, not a folder: choose another --out")
    if not (run / "config.json").exists():
        if resume:
            print(f"nothing saved in {run} yet: starting this run from the beginning")
        run.mkdir(parents=True, exist_ok=True)
        return False
    if overwrite:
        print(f"overwriting the run in {run} (--overwrite)")
        for f in ("state.pt", "log.jsonl", "student.safetensors", "best.safetensors", "results.json"):
            (run / f).unlink(missing_ok=True)
        return False
    old = read_json(run / "config.json")["settings"]
    differ = [k for k in RESULT_SETTINGS if old.get(k) != settings.get(k)]
    if differ and not resume:
        raise RunError(f"{run} already holds a run of another configuration ({', '.join(differ)} differ): "
                       f"choose another --out, or --overwrite to replace it")
    if differ:
        raise RunError(f"cannot resume {run}: its settings differ in {', '.join(differ)} "
                       f"({', '.join(f'{k}={old.get(k)!r}' for k in differ)})")
    if not resume:
        if (run / "results.json").exists():
            raise RunError(f"{run} already holds this finished run (results.json): evaluate.py re-evaluates it, "
                           f"--overwrite trains it again")
        raise RunError(f"{run} already holds this run, unfinished: add --resume to continue it, or --overwrite "
                       f"to start again")
    if not (run / "state.pt").exists():  # stopped before its first epoch ended: nothing to lose
        print(f"no saved state in {run} yet: starting this run from the beginning")
        return False
    return True


def keep_earlier(run: Path, epochs: int):
    """Before --resume extends a finished run: keep its results and student under names of their own."""
    for name in ("results.json", "student.safetensors"):
        if (run / name).exists():
            kept = run / name.replace(".", f"-{epochs}ep.", 1)
            os.replace(run / name, kept)
            print(f"kept the {epochs}-epoch {name} as {kept}")


## --------------------------------------------------------------------------------------------------------
## Teacher-feature cache (VGG recipe: no augmentation, so the frozen teacher gives the same features every epoch).

def host_memory_available() -> int:
    """Bytes the OS could give us now (Linux MemAvailable, counting reclaimable cache), else a sysconf guess."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        names = getattr(os, "sysconf_names", {})
        if "SC_AVPHYS_PAGES" in names and "SC_PAGE_SIZE" in names:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return 0


def feature_cache(kdad: KDAD, images, prep, amp, batch_size, device, precision):
    """Teacher features of the training taps for every training image, computed once; None if they do not fit.
    Stored in the dtype the teacher computes in (bf16 under bf16 autocast), so training on them is exact."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with amp():
        probe = kdad.teacher_features(prep(images[:1], center(1, prep.size)), kdad.taps.train_teacher)
    need = sum(f[0].numel() for f in probe) * dtype.itemsize * len(images)
    host = host_memory_available()
    if need < 0.5 * (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host):
        where, pin = device, False
    elif device.type == "cuda" and need < 0.5 * host:
        where, pin = torch.device("cpu"), True
    else:
        print(f"teacher-feature cache: {need / 2**30:.1f} GiB does not fit; recomputing the teacher every step")
        return None
    cache = [torch.empty((len(images), *f.shape[1:]), dtype=dtype, device=where, pin_memory=pin) for f in probe]
    print(f"teacher-feature cache: {need / 2**30:.2f} GiB of {str(dtype)[6:]} "
          + ("in pinned host memory (does not fit on the GPU)" if pin else f"on {where}"))
    order = torch.arange(len(images))
    n = (len(images) + batch_size - 1) // batch_size
    for idx, x in progress(batches(images, order, center(len(images), prep.size), batch_size, prep), n, "caching"):
        with amp():
            for c, f in zip(cache, kdad.teacher_features(x, kdad.taps.train_teacher), strict=True):
                c[idx.to(c.device)] = f.to(c.device, dtype)
    return cache


## --------------------------------------------------------------------------------------------------------
## Training.

def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's order, augmentation and dropout depend on (seed, epoch) only: a resumed run is the same run."""
    return seed * 100_003 + epoch


def train_step(kdad, opt, amp, idx, x, cache=None) -> torch.Tensor:
    """One optimiser step on a preprocessed batch x (images idx, on the CPU); returns the loss on the device."""
    with amp():
        teacher_feats = [c[idx.to(c.device)].to(x.device, non_blocking=True) for c in cache] if cache else None
        loss = kdad.loss(x, teacher_feats)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()  # no .item() here: a GPU would wait for every step


def fresh_epoch() -> dict:
    """Progress within an epoch, saved with a mid-epoch state so a resumed epoch reports the whole epoch."""
    return {"step": 0, "losses": [], "seen": 0, "seconds": 0.0}


def train_epoch(kdad, opt, data, prep, amp, args, epoch, done: dict, cache, stop, on_stop):
    """One pass over the training images, continuing after `done` (see fresh_epoch); returns (mean loss,
    images/s) of the whole epoch. On Ctrl-C: on_stop(progress), then Stop; on the epoch's last step the epoch
    just ends (fit stops after saving it). A NaN/inf loss raises Stop (checked every 50 steps and at the end)."""
    g = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
    n = len(data.train)
    order = torch.randperm(n, generator=g)
    aug = random_augment(n, args.image_size, g) if args.augment else center(n, args.image_size)
    skip = done["step"] * args.batch_size  # a resumed epoch continues at the batch it stopped at
    steps = batches(data.train, order[skip:], aug[skip:], args.batch_size, prep, args.plain)
    total = (n + args.batch_size - 1) // args.batch_size
    losses, seen, t0 = [], done["seen"], time.time()
    kdad.student.train()
    for step, (idx, x) in enumerate(progress(steps, total - done["step"], f"epoch {epoch + 1}"), start=done["step"]):
        losses.append(train_step(kdad, opt, amp, idx, x, cache))
        seen += len(idx)
        if stop["requested"] or step % 50 == 49:
            check_finite(losses, epoch, done["step"])
        if stop["requested"] and step + 1 < total:
            on_stop({"step": step + 1, "losses": done["losses"] + torch.stack(losses).tolist(), "seen": seen,
                     "seconds": done["seconds"] + time.time() - t0})
            raise Stop(f"interrupted at epoch {epoch + 1}, step {step + 1}")
    if losses:
        check_finite(losses, epoch, done["step"])
    all_losses = done["losses"] + (torch.stack(losses).tolist() if losses else [])
    return sum(all_losses) / max(len(all_losses), 1), seen / max(done["seconds"] + time.time() - t0, 1e-9)


def check_finite(losses, epoch, first_step):
    finite = torch.isfinite(torch.stack(losses))
    if not finite.all():
        step = first_step + int((~finite).nonzero()[0]) + 1
        raise Stop(f"non-finite loss at epoch {epoch + 1}, step {step} (try a lower --lr or --precision fp32)")


def build(args, teacher, device, precision):
    """Student, KDAD wrapper, preprocessing, autocast, optimiser and schedule of a new run."""
    torch.manual_seed(args.seed)
    student = place(make_student(args.backbone, teacher), device, args.backbone)
    for model in (teacher, student):  # the plain path runs the written-out attention (no effect on VGG)
        set_fused_attn(model, not args.plain)
    kdad = KDAD(teacher, student, taps_for(args.backbone, teacher), args.lam)
    if args.compile:  # compiled wrappers run; the plain modules are what gets saved (no '_orig_mod.' keys)
        kdad.teacher, kdad.student = torch.compile(teacher), torch.compile(student)
    prep = Preprocess(args.image_size, teacher.cfg.mean, teacher.cfg.std, device, channels_last(args.backbone))
    opt = args.optimizer(student.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, args.gamma)
    return student, kdad, prep, autocast(device, precision), opt, sched


class Snapshots:
    """The resumable state in run/state.pt: weights, optimiser, schedule, position, RNG, history."""

    def __init__(self, run: Path, student, opt, sched, device):
        self.path, self.student, self.opt, self.sched, self.device = run / "state.pt", student, opt, sched, device
        self.state = {"epoch": 0, "partial": fresh_epoch(), "history": [], "best": None, "rng": None}

    def load(self):
        try:  # to the CPU first: load_state_dict puts each tensor where its parameter lives
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            self.student.load_state_dict(saved["student"])
            self.opt.load_state_dict(saved["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
            self.state = {k: saved[k] for k in self.state}
        except Exception as e:  # not written by this code: a finished state.pt is never half-written
            raise RunError(f"{self.path} is unreadable ({type(e).__name__}): use --overwrite to start again") from None

    def save(self, epoch: int, partial: dict):
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        self.state |= {"epoch": epoch, "partial": partial, "rng": rng}
        state = self.state | {"student": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                              "scheduler": self.sched.state_dict()}
        write_atomically(self.path, lambda tmp: torch.save(state, tmp))

    def seed_epoch(self, seed: int, epoch: int):
        """Dropout draws from the global generator: seed it per epoch, or restore it mid-epoch on resume."""
        if self.state["partial"]["step"] == 0:
            torch.manual_seed(epoch_seed(seed, epoch) + 50_000)
            return
        torch.set_rng_state(self.state["rng"]["cpu"])
        if "cuda" in self.state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state["rng"]["cuda"], self.device)


def validate(args, kdad, data, prep, amp) -> dict:
    """End-of-epoch figures: the loss on held-out normal images (no labels needed), and, only for
    --select val-auroc, the validation AUROC (which uses the validation images' anomaly labels)."""
    normal = data.val[data.val_labels == 0]
    out = {"val_normal_loss": score_images(kdad, normal, prep, amp, args.eval_batch_size, train_taps=True,
                                           plain=args.plain).mean().item()}
    if args.select == "val-auroc":
        scores = score_images(kdad, data.val, prep, amp, args.eval_batch_size, plain=args.plain)
        out["val_auroc"] = auroc(scores, data.val_labels.cpu())
    return out


def fit(args, data, teacher, device, precision, run: Path, resume: bool) -> dict:
    """Train for args.epochs (continuing run/state.pt if `resume`), select the model (final epoch unless
    --select val-auroc), save it; returns the training figures for results.json. Stop is raised, with what
    was kept, on Ctrl-C or a non-finite loss."""
    student, kdad, prep, amp, opt, sched = build(args, teacher, device, precision)
    snaps = Snapshots(run, student, opt, sched, device)
    if resume:
        snaps.load()
        if snaps.state["epoch"] > args.epochs:
            raise RunError(f"{snaps.path} is at epoch {snaps.state['epoch']}, past --epochs {args.epochs}: resume "
                           f"with --epochs {snaps.state['epoch']} or more")
        print(f"resuming {run} at epoch {snaps.state['epoch'] + 1}, step {snaps.state['partial']['step']}")
    cache = None
    if not (args.augment or args.no_cache or args.plain):
        cache = feature_cache(kdad, data.train, prep, amp, args.eval_batch_size, device, precision)
    history, stop = snaps.state["history"], {"requested": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    try:
        for epoch in range(snaps.state["epoch"], args.epochs):
            snaps.seed_epoch(args.seed, epoch)
            try:
                loss, speed = train_epoch(kdad, opt, data, prep, amp, args, epoch, snaps.state["partial"], cache,
                                          stop, lambda progress, e=epoch: snaps.save(e, progress))
            except Stop as e:
                raise Stop(f"{e}; {what_was_kept(snaps, stop['requested'])}") from None
            sched.step()
            record = {"epoch": epoch + 1, "loss": loss, "images_per_s": speed, "lr": opt.param_groups[0]["lr"],
                      **validate(args, kdad, data, prep, amp)}
            best = snaps.state["best"]
            if "val_auroc" in record and (best is None or record["val_auroc"] > best["val_auroc"]):
                snaps.state["best"] = {"epoch": epoch + 1, "val_auroc": record["val_auroc"]}
                save_tensors(student.state_dict(), run / "best.safetensors")
            history.append(record)
            snaps.save(epoch + 1, fresh_epoch())
            write_text(run / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}  val-normal-loss "
                  f"{record['val_normal_loss']:.4f}  {speed:7.1f} img/s"
                  + (f"  val-auroc {record['val_auroc']:.4f}" if "val_auroc" in record else ""))
            if stop["requested"]:  # Ctrl-C on an epoch's last step or during its validation
                raise Stop(f"interrupted after epoch {epoch + 1}; {what_was_kept(snaps, True)}")
    finally:
        signal.signal(signal.SIGINT, previous)
    return finish(args, kdad, student, data, prep, amp, run, history, snaps.state["best"])


def what_was_kept(snaps: Snapshots, interrupted: bool) -> str:
    resume = "; continue it with the same command and --resume"
    if interrupted:
        return f"saved a resumable state in {snaps.path}{resume}"
    if snaps.path.exists():
        e, step = snaps.state["epoch"], snaps.state["partial"]["step"]
        where = f"epoch {e + 1}, step {step}" if step else f"end of epoch {e}"
        return f"the last good state ({where}) is kept in {snaps.path}{resume}"
    return "nothing was saved yet"


def finish(args, kdad, student, data, prep, amp, run, history, best) -> dict:
    """Score validation and test once with the selected student and save it."""
    selected = args.epochs
    if args.select == "val-auroc":
        selected = best["epoch"]
        load_student(run / "best.safetensors", student)
        print(f"selected epoch {selected} by validation AUROC (this uses the validation images' anomaly labels)")
    t0 = time.time()
    val = score_images(kdad, data.val, prep, amp, args.eval_batch_size, plain=args.plain)
    test = score_images(kdad, data.test, prep, amp, args.eval_batch_size, plain=args.plain)
    score_speed = (len(val) + len(test)) / (time.time() - t0)
    save_tensors(student.state_dict(), run / "student.safetensors")
    return {"val_auroc": auroc(val, data.val_labels.cpu()), "test_auroc": auroc(test, data.test_labels.cpu()),
            "val_normal_loss": history[selected - 1]["val_normal_loss"], "epochs": args.epochs,
            "selected_epoch": selected, "selection": args.select, "uses_anomaly_labels": args.select == "val-auroc",
            "train_images_per_s": sum(r["images_per_s"] for r in history) / len(history),
            "score_images_per_s": score_speed}


def run_class(args, source, cls, teacher, teacher_info, device, precision, run: Path) -> dict:
    """Train and score one normal class into the run folder `run`; returns results.json's content."""
    started = time.time()
    data = one_class_data(source, cls, args.seed, args.limit)
    settings = {k: v for k, v in vars(args).items() if k != "optimizer"}
    settings |= {"cls": data.normal_class, "class_name": data.class_name, "precision": precision,
                 "data_dir": args.data_dir and str(Path(args.data_dir).resolve()),
                 "data_root": str(Path(args.data_root).resolve()),
                 "teacher_sha256": teacher_info["sha256"], "optimizer": args.optimizer.__name__}
    resume = prepare_run_dir(run, settings, args.resume, args.overwrite)
    if resume and (run / "results.json").exists():
        done = read_json(run / "results.json")
        if done["epochs"] >= args.epochs:
            print(f"class {done['cls']} ({done['class_name']}) already finished {done['epochs']} epochs: test AUROC "
                  f"{done['test_auroc']:.4f} ({run}/results.json; --overwrite trains it again)")
            return done
        keep_earlier(run, done["epochs"])  # --resume with more epochs extends a finished run
    print(data.summary())
    config = {"settings": settings, "teacher": teacher_info, "taps": asdict(taps_for(args.backbone, teacher)),
              "student": asdict(student_config_for(args.backbone, teacher)),
              "code": code_version(), "torch": torch.__version__, "device": str(device)}
    write_text(run / "config.json", json.dumps(config, indent=2) + "\n")
    results = {"backbone": args.backbone, "cls": data.normal_class, "class_name": data.class_name,
               "teacher": teacher_info["name"], "teacher_saw_cifar10_labels": teacher_info["label_leak"],
               **fit(args, data.to(device), teacher, device, precision, run, resume),
               "seconds": time.time() - started, "seed": args.seed, "device": str(device), "precision": precision,
               "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test)}
    write_text(run / "results.json", json.dumps(results, indent=2) + "\n")
    print(f"class {results['cls']} ({results['class_name']}): val AUROC {results['val_auroc']:.4f}  "
          f"test AUROC {results['test_auroc']:.4f}  ({results['seconds']:.0f} s)  -> {run}")
    return results


def describe(teacher) -> str:
    c = teacher.cfg
    if hasattr(c, "patch_size"):
        return (f"{teacher.layout} ViT, {c.depth} blocks, width {c.width}, patch {c.patch_size}, {c.registers} "
                f"registers, at {c.image_size} px, mean/std {c.mean}/{c.std}")
    return f"VGG16, stage widths {teacher.stage_channels}, mean/std {c.mean}/{c.std}"


def prepare_teacher(args, device):
    """Resolve, load and describe the teacher; returns (teacher, its identity for config.json, a short name)."""
    name = args.teacher or DEFAULT_TEACHER[args.backbone]
    path, short, preset = resolve_teacher(name, args.cache_dir)
    teacher = place(load_teacher(path, args.backbone, args.image_size, args.teacher_mean, args.teacher_std), device,
                    args.backbone)
    info = {"name": name, "preset": preset, "path": str(Path(path).resolve()), "sha256": sha256(path),
            "layout": getattr(teacher, "layout", "torchvision"), "config": asdict(teacher.cfg),
            "label_leak": preset == "vit-b16-cifar10"}
    print(f"teacher: {name}" + (f" ({PRESETS[preset].note})" if preset else "") + f": {describe(teacher)}")
    if not preset and args.teacher_mean is None and getattr(teacher, "layout", None) in ("timm", "huggingface"):
        print(f"  note: normalising with the {teacher.layout} default mean/std; if this checkpoint was trained with "
              f"others (e.g. timm's ImageNet-21k ViTs use 0.5), pass --teacher-mean/--teacher-std")
    if info["label_leak"]:
        print(f"  note: this teacher was fine-tuned on CIFAR-10 labels of all ten classes, so it has seen the "
              f"anomalies with labels; label-free presets: {', '.join(LABEL_FREE_VIT)}")
    return teacher, info, short


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        precision = pick_precision(args.precision, device)
        if precision == "bf16":  # fp32 stays true fp32; with bf16 autocast, let the remaining fp32 matmuls use TF32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        teacher, info, short = prepare_teacher(args, device)
        print(f"device: {device}, precision: {precision}")
        source = open_source(args.data_dir, args.data_root, args.image_size)
        every = args.cls == "all"
        base = Path(args.out or f"runs/{args.backbone}-{short}-{args.cls}-s{args.seed}")
        runs = [base / f"{c}-{name}" for c, name in enumerate(source.classes)] if every else [base]
        for cls, run in zip(range(len(source.classes)) if every else [args.cls], runs, strict=True):
            run_class(args, source, cls, teacher, info, device, precision, run)
        if every:
            print(write_table(runs, base / "table"))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stop as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130 if str(e).startswith("interrupted") else 3
    except OSError as e:  # an unwritable --out or cache folder, a full disk
        print(f"error: {e} (check the path, its permissions and the free space)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (loading, scoring): files are only ever replaced whole
        print("stopped: interrupted; everything saved so far is intact (an unfinished run continues with --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
