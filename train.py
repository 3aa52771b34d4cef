"""Train a KDAD student on one normal class and report its test ROC AUC, once, at the end.

    python train.py --backbone vit --cls 3                      # the ViT reproduction's recipe, class 3 (cat)
    python train.py --backbone vgg --cls all                    # the paper's VGG16 recipe, ten classes + table
    python train.py --backbone vit --cls cat --teacher dino-vitb16 --data-dir path/to/cifar10-jpeg
    python train.py --backbone vit --cls 3 --image-size 32 --epochs 1 --limit 300    # a quick CPU check

This file is the recipe and the training loop, read top to bottom: the recipes (the paper's and the
reproduction's), the teacher-feature cache, one training step, one epoch, the fit over all epochs, the final
scoring, the jobs (one per class and seed, spread over torchrun's processes), and the command line. The protocol
(validation held out from the training split, test scored once, final epoch unless --select val-auroc) is
data.py's; the run folder's record (config.json, state.pt, log.jsonl, results.json, resume checks) is record.py's;
the flags, device and precision are cli.py's.
"""
import sys

import cli

if __name__ == "__main__":  # flags first: --help and a mistyped flag answer before torch's 5-second import
    cli.train_args(sys.argv[1:])
    cli.quiet_interrupt()

import os  # the rest waits for the flag check above
import signal
import time
import traceback
from argparse import Namespace
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

from checkpoint import (DEFAULT_TEACHER, LABEL_FREE_VIT, PRESETS, CheckpointError, read_header, resolve_teacher,
                        save_tensors, sha256)
from cli import RunError, autocast, pick_device, pick_precision, progress
from data import CIFAR10_CLASSES, CROP_PCT, DataError, Preprocess, batches, class_index, one_class_data, open_source
from distill import (KDAD, channels_last, image_embedding, load_teacher, make_student, place, student_config_for,
                     taps_for)
from evaluate import (auroc, fmt, knn_aurocs, load_student, localisation, score_images, teacher_embeddings,
                      write_table)
from record import TORCHVISION_CIFAR10, Run, Snapshots, default_run_dir, fresh_epoch, teacher_name
from vit import set_fused_attn

## The recipes, per data set and backbone. On CIFAR-10 (and any image folder laid out like it) the VGG one is the
## paper's code (rohban-lab/Knowledge_Distillation_AD) and the ViT one the reproduction's (LucStrater/
## Knowledge_Distillation_AD, vit_kdad.ipynb). On MVTec AD the VGG one is the paper's code with its MVTec settings:
##   configs/config.yaml line 15 (commit 0dbc8c0): `lamda: 0.01 # mvtec:0.5, Others:0.01`
##   configs/config.yaml line 8 (0dbc8c0): `num_epochs: 201 # mnist/fashionmnist:51, cifar10:201, mvtec:601`
##     (counted here as 600, as CIFAR-10's 201 are 200; batch 64 and Adam 1e-3 as for CIFAR-10)
##   configs/config.yaml line 14 (commit 72eab92): `mvtec_img_size: 128`
##   dataloader.py lines 75-78 (0dbc8c0): `transforms.Resize([mvtec_img_size, mvtec_img_size]), transforms.ToTensor()`
##     (the whole image resized, no crop, and no normalisation: VGG16 sees pixels in [0, 1])
## No MVTec recipe exists for the ViT (the reproduction ran CIFAR-10 only): ours keeps the ViT recipe's optimiser and
## the paper's MVTec lambda, sees whole images without augmentation (a flipped part can be a defect), and takes
## batches of 16 for 50 epochs so that a category of a few hundred images gets as many steps as a CIFAR-10 class
## does; a starting point, not tuned on MVTec data.
CIFAR, MVTEC = dict(lam=0.01, image_size=224, crop_pct=CROP_PCT), dict(lam=0.5, crop_pct=1.0)
RECIPES = {
    "cifar10": {
        "vgg": CIFAR | dict(epochs=200, batch_size=64, lr=1e-3, optimizer=torch.optim.Adam, milestones=[], gamma=1.0,
                            augment=False),  # no augmentation: the teacher's features can be computed once and cached
        "vit": CIFAR | dict(epochs=10, batch_size=128, lr=5e-5, optimizer=torch.optim.AdamW, milestones=[5],
                            gamma=0.2, augment=True),  # random crop + flip; AdamW's default weight decay 0.01
    },
    "mvtec": {
        "vgg": MVTEC | dict(epochs=600, batch_size=64, lr=1e-3, optimizer=torch.optim.Adam, milestones=[], gamma=1.0,
                            augment=False, image_size=128, teacher_mean=(0.0,) * 3, teacher_std=(1.0,) * 3),
        "vit": MVTEC | dict(epochs=50, batch_size=16, lr=5e-5, optimizer=torch.optim.AdamW, milestones=[25],
                            gamma=0.2, augment=False, image_size=224),
    },
}
USER_ERRORS = (CheckpointError, DataError, RunError)


class Stop(Exception):
    """Training ended early: Ctrl-C, or a non-finite loss. The message says what was kept."""


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
        probe = kdad.teacher_features(prep(images[:1], prep.center(1)), kdad.taps.train_teacher)
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
    with progress(batches(images, order, prep.center(len(images)), batch_size, prep), n, "caching") as bar:
        for idx, x in bar:
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


def train_epoch(kdad, opt, data, prep, amp, args, epoch, done: dict, cache, stop, on_stop) -> dict:
    """One pass over the training images, continuing after `done` (record.fresh_epoch); returns the whole epoch's
    {"loss": mean loss, "images": images trained on, "seconds": seconds spent}. On Ctrl-C: on_stop(progress), then
    Stop; on the epoch's last step the epoch just ends (fit stops after saving it). A NaN/inf loss raises Stop
    (checked every 50 steps and at the end)."""
    g = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
    n = len(data.train)
    order = torch.randperm(n, generator=g)
    aug = prep.random_augment(n, g) if args.augment else prep.center(n)
    skip = done["step"] * args.batch_size  # a resumed epoch continues at the batch it stopped at
    steps = batches(data.train, order[skip:], aug[skip:], args.batch_size, prep, args.plain)
    total = (n + args.batch_size - 1) // args.batch_size
    losses, seen, t0 = [], done["seen"], time.time()
    kdad.student.train()
    with progress(steps, total - done["step"], f"epoch {epoch + 1}/{args.epochs}") as bar:
        for step, (idx, x) in enumerate(bar, start=done["step"]):
            losses.append(train_step(kdad, opt, amp, idx, x, cache))
            seen += len(idx)
            if stop["requested"] or step % 50 == 49:
                check_finite(losses, epoch, done["step"])
            if step % 10 == 0 or step + 1 == total:  # a device sync every 10 steps for the bar's loss, not each step
                bar.set_postfix_str(f"loss {losses[-1].item():.4f}", refresh=False)
            if stop["requested"] and step + 1 < total:
                bar.close()
                on_stop({"step": step + 1, "losses": done["losses"] + torch.stack(losses).tolist(), "seen": seen,
                         "seconds": done["seconds"] + time.time() - t0})
                raise Stop(f"interrupted at epoch {epoch + 1}, step {step + 1}")
    if losses:
        check_finite(losses, epoch, done["step"])
    all_losses = done["losses"] + (torch.stack(losses).tolist() if losses else [])
    return {"loss": sum(all_losses) / max(len(all_losses), 1), "images": seen,
            "seconds": done["seconds"] + time.time() - t0}


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
    prep = Preprocess(args.image_size, teacher.cfg.mean, teacher.cfg.std, device, channels_last(args.backbone),
                      args.crop_pct)
    opt = args.optimizer(student.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, args.gamma)
    return student, kdad, prep, autocast(device, precision), opt, sched


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


def fit(args, data, teacher, device, precision, run: Run, resume: bool) -> dict:
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
        at = snaps.state["epoch"]
        print(f"resuming {run}: " + (f"all {at} epochs trained, scoring" if at == args.epochs else
                                     f"at epoch {at + 1}, step {snaps.state['partial']['step']}"))
    cache = None
    if not (args.augment or args.no_cache or args.plain):
        cache = feature_cache(kdad, data.train, prep, amp, args.eval_batch_size, device, precision)
    history, stop = snaps.state["history"], {"requested": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    try:
        for epoch in range(snaps.state["epoch"], args.epochs):
            snaps.restore_rng(epoch_seed(args.seed, epoch) + 50_000)
            try:
                trained = train_epoch(kdad, opt, data, prep, amp, args, epoch, snaps.state["partial"], cache, stop,
                                      lambda partial, e=epoch: snaps.save(e, partial))
            except Stop as e:
                raise Stop(f"{e}; {snaps.kept(stop['requested'])}") from None
            sched.step()
            record = {"epoch": epoch + 1, "loss": trained["loss"], "images": trained["images"],
                      "seconds": trained["seconds"], "images_per_s": trained["images"] / trained["seconds"],
                      "lr": opt.param_groups[0]["lr"], **validate(args, kdad, data, prep, amp)}
            best = snaps.state["best"]
            if "val_auroc" in record and (best is None or record["val_auroc"] > best["val_auroc"]):
                snaps.state["best"] = {"epoch": epoch + 1, "val_auroc": record["val_auroc"]}
                save_tensors(student.state_dict(), run.path / "best.safetensors")
            history.append(record)
            snaps.save(epoch + 1, fresh_epoch())
            run.end_epoch(epoch + 1, history)
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {record['loss']:.4f}  val-normal-loss "
                  f"{record['val_normal_loss']:.4f}  {record['images_per_s']:7.1f} img/s"
                  + (f"  val-auroc {record['val_auroc']:.4f}" if "val_auroc" in record else ""))
            if stop["requested"]:  # Ctrl-C on an epoch's last step or during its validation
                raise Stop(f"interrupted after epoch {epoch + 1}; {snaps.kept(True)}")
    finally:
        signal.signal(signal.SIGINT, previous)
    return finish(args, kdad, student, data, prep, amp, run, history, snaps.state["best"], cache)


def finish(args, kdad, student, data, prep, amp, run: Run, history, best, cache) -> dict:
    """Score validation and test once with the selected student and save it; the teacher-alone kNN baseline comes
    from the same teacher passes."""
    selected = args.epochs
    if args.select == "val-auroc":
        selected = best["epoch"]
        load_student(run.path / "best.safetensors", student)
        print(f"selected epoch {selected} by validation AUROC (this uses the validation images' anomaly labels)")
    t0 = time.time()
    val, val_embedding = score_images(kdad, data.val, prep, amp, args.eval_batch_size, plain=args.plain, embed=True)
    test, test_embedding = score_images(kdad, data.test, prep, amp, args.eval_batch_size, plain=args.plain,
                                        embed=True)
    score_speed = (len(val) + len(test)) / (time.time() - t0)
    save_tensors(student.state_dict(), run.path / "student.safetensors")
    images, seconds = sum(r["images"] for r in history), sum(r["seconds"] for r in history)
    results = {"val_auroc": auroc(val, data.val_labels.cpu()), "test_auroc": auroc(test, data.test_labels.cpu()),
               "val_normal_loss": history[selected - 1]["val_normal_loss"], "epochs": args.epochs,
               "selected_epoch": selected, "selection": args.select,
               "uses_anomaly_labels": args.select == "val-auroc", "train_images": images, "train_seconds": seconds,
               "train_images_per_s": images / max(seconds, 1e-9), "score_images_per_s": score_speed}
    if args.knn_k:
        results |= knn_baseline(args, kdad, data, prep, amp, cache, val_embedding, test_embedding)
    if data.test_masks is not None:  # MVTec AD: where the defects are, against the masks
        results |= localisation(kdad, data, prep, amp)
    return results


def knn_baseline(args, kdad, data, prep, amp, cache, val_embedding, test_embedding) -> dict:
    """The teacher alone, no training: val/test images scored by their mean cosine distance to the k nearest
    normal training images in the teacher's global feature space (evaluate.knn_scores). The training images'
    features come from the feature cache when there is one (its last tap is the teacher's last output), else
    from one teacher-only pass; val/test features came with the scoring passes."""
    t0 = time.time()
    if cache is not None:
        last = cache[-1]
        bank = torch.cat([image_embedding(kdad.teacher, last[i:i + args.eval_batch_size].float()).cpu()
                          for i in range(0, len(last), args.eval_batch_size)])
    else:
        bank = teacher_embeddings(kdad, data.train, prep, amp, args.eval_batch_size, args.plain)
    return knn_aurocs(bank, val_embedding, test_embedding, data, args.knn_k) | {
        "knn_k": args.knn_k, "knn_feature": "final normalised CLS token" if args.backbone == "vit" else
        "pool5, global average", "knn_seconds": time.time() - t0}


## --------------------------------------------------------------------------------------------------------
## One class: its data, its run folder, its training, its results.

def data_identity(args) -> str:
    """What `data` a run records and compares on resume: the image folder (resolved), or torchvision's CIFAR-10
    (the same data wherever --data-root downloaded it)."""
    return str(Path(args.data_dir).resolve()) if args.data_dir else TORCHVISION_CIFAR10


def is_cifar10(source) -> bool:
    """torchvision's CIFAR-10, or a folder whose class folders (train/ and test/) are exactly CIFAR-10's."""
    return list(source.folders) == list(CIFAR10_CLASSES)


def run_class(args, source, cls, teacher, teacher_info, device, precision, run: Run, finished_ok=False) -> dict:
    """Train and score one normal class into the run folder `run`; returns results.json's content. finished_ok:
    the same run already finished is reported, not refused (one job of many; see Run.open)."""
    started = time.time()
    data = one_class_data(source, cls, args.seed, args.limit)
    if args.select == "val-auroc" and not data.val_has_anomalies:
        raise RunError(f"--select val-auroc needs anomalous validation images, and train/ holds only the normal "
                       f"images of {data.class_name!r}: use --select final")
    if args.knn_k > len(data.train):
        raise RunError(f"--knn-k {args.knn_k} needs at least {args.knn_k} training images of class "
                       f"{data.class_name!r}; there are {len(data.train)}: lower --knn-k (0 skips the baseline)")
    settings = {k: v for k, v in vars(args).items() if k not in ("optimizer", "seeds")}
    settings |= {"cls": data.normal_class, "class_name": data.class_name, "precision": precision,
                 "data": data_identity(args), "data_dir": args.data_dir and str(Path(args.data_dir).resolve()),
                 "data_root": str(Path(args.data_root).resolve()), "teacher_sha256": teacher_info["sha256"],
                 "optimizer": args.optimizer.__name__}
    resume = run.open(settings, args.resume, args.overwrite, finished_ok)
    done = run.results() if resume else None
    if done and done["epochs"] >= args.epochs:
        epochs = f"{done['epochs']} epoch" + "s" * (done["epochs"] != 1)
        print(f"class {done['cls']} ({done['class_name']}) already finished {epochs}: test AUROC "
              f"{done['test_auroc']:.4f} ({run}/results.json; --overwrite trains it again)")
        return done
    if done:
        run.keep_earlier(done["epochs"])  # --resume with more epochs extends a finished run
    print(data.summary())
    run.write_config({"settings": settings, "teacher": teacher_info,
                      "data": {"cifar10": is_cifar10(source), "classes": list(source.classes),
                               "test_only": list(source.test_only)} | data.record(),
                      "taps": asdict(taps_for(args.backbone, teacher)),
                      "student": asdict(student_config_for(args.backbone, teacher)),
                      "torch": torch.__version__, "device": str(device)}, resume)
    results = {"backbone": args.backbone, "cls": data.normal_class, "class_name": data.class_name,
               "teacher": teacher_info["name"], "teacher_saw_cifar10_labels": teacher_info["label_leak"],
               **fit(args, data.to(device), teacher, device, precision, run, resume),
               "seconds": time.time() - started, "seed": args.seed, "device": str(device), "precision": precision,
               "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test)}
    run.write_results(results)
    val = "n/a (no anomalous validation images)" if results["val_auroc"] is None else f"{results['val_auroc']:.4f}"
    knn = f"  (teacher kNN alone {results['knn_test_auroc']:.4f})" if args.knn_k else ""
    where = ""
    if "pixel_auroc" in results:
        where = "".join(f"  {name} {fmt(results[key], 4, 1)}" for name, key in (
            ("pixel AUROC", "pixel_auroc"), ("PRO", "pro"), ("(mismatch map:", "pixel_auroc_mismatch"),
            ("PRO", "pro_mismatch"))) + ")"
    print(f"class {results['cls']} ({results['class_name']}): val AUROC {val}  test AUROC "
          f"{results['test_auroc']:.4f}{knn}{where}  ({results['seconds']:.0f} s)  -> {run}")
    return results


## --------------------------------------------------------------------------------------------------------
## The teacher, and the command line.

def describe(teacher) -> str:
    c = teacher.cfg
    if hasattr(c, "patch_size"):
        return (f"{teacher.layout} ViT, {c.depth} blocks, width {c.width}, patch {c.patch_size}, {c.registers} "
                f"registers, at {c.image_size} px, mean/std {c.mean}/{c.std}")
    return f"VGG16, stage widths {teacher.stage_channels}, mean/std {c.mean}/{c.std}"


def prepare_teacher(args, device):
    """Resolve, load and describe the teacher; returns (teacher, its identity for config.json)."""
    name = args.teacher
    found = resolve_teacher(name, args.cache_dir)
    path, preset = found.path, found.preset
    teacher = place(load_teacher(path, args.backbone, args.image_size, args.teacher_mean, args.teacher_std), device,
                    args.backbone)
    info = {"name": name, "short_name": teacher_name(name, path, preset), "preset": preset, "origin": found.origin,
            "path": str(Path(path).resolve()), "sha256": sha256(path),
            "layout": getattr(teacher, "layout", "torchvision"), "config": asdict(teacher.cfg),
            "label_leak": preset == "vit-b16-cifar10"}
    print(f"teacher: {name}" + (f" ({PRESETS[preset].note})" if preset else "") + f": {describe(teacher)}")
    if not preset and args.teacher_mean is None and str(getattr(teacher, "layout", "")).startswith(("timm",
                                                                                                      "huggingface")):
        print(f"  note: normalising with the {teacher.layout} family's usual mean/std {teacher.cfg.mean}/"
              f"{teacher.cfg.std}; a checkpoint trained with other values needs --teacher-mean/--teacher-std")
    if info["label_leak"]:
        print(f"  note: this teacher was fine-tuned on CIFAR-10 labels of all ten classes, so it has seen the "
              f"anomalies with labels; label-free presets: {', '.join(LABEL_FREE_VIT)}")
    elif classifier_classes(path) == 10:
        print("  note: this checkpoint carries a 10-class classifier head: if it was fine-tuned on CIFAR-10 (as the "
              "reproduction's teacher was), it has seen the anomalies with labels")
    return teacher, info


def classifier_classes(path) -> int | None:
    """The number of classes of a checkpoint's classification head (HF `classifier`, timm `head` / `head.fc`,
    torchvision `heads.head` / `classifier.6`), read from the file's header; None without one."""
    header = read_header(path)
    for key in ("classifier.weight", "head.weight", "head.fc.weight", "heads.head.weight", "classifier.6.weight"):
        if key in header:
            return header[key]["shape"][0]
    return None


def with_recipe(args):
    """Fill the flags left out with the recipe of the data set and backbone (RECIPES, DEFAULT_TEACHER)."""
    recipe = RECIPES[args.dataset][args.backbone] | {"teacher": DEFAULT_TEACHER[args.dataset][args.backbone]}
    for name, value in recipe.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


## --------------------------------------------------------------------------------------------------------
## Jobs: one (class, seed) each, in the run folder a single-process run of it uses; spread over torchrun's processes.

@dataclass
class Job:
    cls: str | int  # as --cls takes it (a folder name, a number, name:X, index:N), or an index for --cls all
    seed: int
    run: Path


def plan(args, source, teacher_info) -> tuple[list[Job], Path | None]:
    """The jobs of this command and where their table goes (None for one class and one seed).

    One seed: runs/<name>-<class>-s<seed>, or for --cls all one folder runs/<name>-all-s<seed> holding a
    <index>-<class> folder per class and the table. Several seeds (--seed 0 1 2): the same folders for each seed,
    and the table over all of them in runs/<name>-<class or all>-s0-1-2/. --out replaces runs/<...>-s<seed> by
    OUT (one seed) or OUT/s<seed> (several)."""
    data = Path(args.data_dir).resolve().name if args.data_dir else None
    def folder(label, seed):
        if args.out:
            return Path(args.out) / f"s{seed}" if len(args.seeds) > 1 else Path(args.out)
        return default_run_dir(args.backbone, teacher_info["short_name"], data, label, seed, args.image_size,
                               args.limit, args.epochs, RECIPES[args.dataset][args.backbone]["epochs"])
    if args.cls == "all":
        label, classes = "all", [(i, f"{i}-{source.classes[i]}") for i in source.normal_classes]
        if len(classes) < len(source.classes):
            left = [n for i, n in enumerate(source.classes) if i not in source.normal_classes]
            print(f"note: --cls all runs the classes with train and test images; not {', '.join(left)} (no test "
                  f"images: they are anomalies in validation only)")
    else:
        label, classes = source.classes[class_index(source, args.cls)], [(args.cls, None)]
    jobs = [Job(cls, seed, folder(label, seed) / sub if sub else folder(label, seed))
            for seed in args.seeds for cls, sub in classes]
    if len(jobs) == 1:
        return jobs, None
    if len(args.seeds) == 1:
        return jobs, folder(label, args.seeds[0]) / "table"
    return jobs, (Path(args.out) if args.out else folder(label, "-".join(map(str, args.seeds)))) / "table"


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's RANK, WORLD_SIZE and LOCAL_RANK, or (0, 1, 0) for plain python."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def gather(obj, world: int) -> list:
    """Every process's `obj`, in rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def setup(args, local_rank: int, world: int):
    """Device, precision, teacher and data of this process. Under torchrun the first process of each machine
    fetches the teacher and the data first and the others then read them from the cache, so no two processes
    write the same file; an error in any process stops all of them, each with its own line."""
    error, prepared = None, None
    for turn in (True, False):  # local rank 0 first, then the others
        if (local_rank == 0) == turn:
            try:
                device = pick_device(args.device, local_rank if world > 1 else None)
                precision = pick_precision(args.precision, device)
                if precision == "bf16":  # fp32 stays fp32; with bf16 autocast, let the rest of fp32 use TF32
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
                teacher, info = prepare_teacher(args, device)
                source = open_source(args.data_dir, args.data_root, args.image_size, args.crop_pct, args.dataset)
                prepared = (device, precision, teacher, info, source)
            except USER_ERRORS + (OSError,) as e:
                error = e
        if world > 1:
            torch.distributed.barrier()
    errors = gather(None if error is None else str(error), world)
    if error is not None:
        raise error
    if any(errors):
        raise RunError(f"another process could not start ({next(e for e in errors if e)})")
    return prepared


def run_jobs(args, rank: int, world: int, local_rank: int) -> int:
    """Every job of this command; this process takes jobs rank, rank + world, ... With more than one job, a job
    that fails is reported and the others go on; the table covers the finished runs and names the failed ones."""
    device, precision, teacher, info, source = setup(args, local_rank, world)
    print(f"device: {device}, precision: {precision}" + (f", process {rank + 1}/{world}" if world > 1 else ""))
    jobs, table = plan(args, source, info)
    mine = jobs[rank::world]
    failed = []
    for k, job in enumerate(mine, start=1):
        if len(jobs) > 1:
            print(f"{'class' if len(args.seeds) == 1 else 'job'} {k}/{len(mine)}: {job.run} (seed {job.seed})"
                  + (f", process {rank + 1}/{world}" if world > 1 else ""))
        try:
            run_class(Namespace(**vars(args), seed=job.seed), source, job.cls, teacher, info, device, precision,
                      Run(job.run), finished_ok=len(jobs) > 1)
        except Exception as e:  # Ctrl-C (KeyboardInterrupt, or Stop "interrupted ...") stops every job
            if len(jobs) == 1 or (isinstance(e, Stop) and str(e).startswith("interrupted")):
                raise
            failed.append(f"{job.run}: {job_error(e, job.run)}")
            print(f"error: job {failed[-1]}; the other jobs go on", file=sys.stderr)
    failed = [f for part in gather(failed, world) for f in part]
    if table is not None and rank == 0:
        finished = [job.run for job in jobs if (job.run / "results.json").is_file()]
        if finished:
            print(write_table(finished, table))
        for f in failed:
            print(f"failed: {f}")
        if failed:
            print(f"{len(failed)} of {len(jobs)} jobs failed; after fixing the cause, the same command with --resume "
                  f"does only what is missing")
    return 2 if failed else 0


def job_error(e: Exception, run: Path) -> str:
    """What went wrong with a job, in one line; the traceback of an unexpected error is kept in its run folder."""
    if isinstance(e, Stop):
        return f"stopped: {e}"
    if isinstance(e, USER_ERRORS + (OSError,)):
        return str(e)
    if run.is_dir():
        (run / "error.txt").write_text("".join(traceback.format_exception(e)))
        return f"{type(e).__name__}: {e} (traceback in {run / 'error.txt'})"
    return f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    args = with_recipe(cli.train_args(argv))
    rank, world, local_rank = distributed()
    if world > 1:  # gloo only hands out the job list and gathers failures: the jobs themselves share nothing
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=30))
    try:
        return run_jobs(args, rank, world, local_rank)
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
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli.ready_for_interrupts()
    sys.exit(main())
