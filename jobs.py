"""The command line of train.py around the method: one job per (class, seed), spread over torchrun's processes; the
teacher and the data of a process; each job's run folder; and one line and an exit code for whatever goes wrong.

`python train.py ...` lands in main() here (train.main); train.py itself holds the recipes and the loop. Exit codes:
0 done, 2 bad input, a GPU out of memory or a failed job (the message says which and what to do), 3 a diverged run,
130 Ctrl-C.

Under torchrun the processes talk over gloo, only to hand out jobs and collect what they did: the start-up steps
(each machine's first process fetches the teacher and the data, then the others read them) time out after
KDAD_DIST_TIMEOUT minutes (default 30), so a process that hangs there shows; the wait at the end for the slowest
process's jobs is not limited by it (processes legitimately finish hours apart).
"""
import os
import sys
import time
import traceback
from argparse import Namespace
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

import cli
from checkpoint import CheckpointError, read_header, sha256
from hub import DEFAULT_TEACHER, PRESETS, resolve_teacher
from cli import RunError, note, pick_device, pick_precision, set_numerics
from data import CIFAR10_CLASSES, DataError
from distill import load_teacher, place, student_config_for, taps_for
from folders import class_index, open_source
from record import (TORCHVISION_CIFAR10, ImagesChanged, Run, data_as_recorded, default_run_dir, image_record, read_json,
                    teacher_changes, teacher_name, write_text)
from steps import Stop
from tables import fmt, write_table
from train import RECIPES, fit
from writes import WRITTEN, WriteError, os_error_line

USER_ERRORS = (CheckpointError, DataError, RunError)


## --------------------------------------------------------------------------------------------------------
## One class: its data, its run folder, its training, its results.

def data_identity(args) -> str:
    """What `data` a run records and compares on resume: the image folder (resolved), or torchvision's CIFAR-10
    (the same data wherever --data-root downloaded it)."""
    return str(Path(args.data_dir).resolve()) if args.data_dir else TORCHVISION_CIFAR10


def is_cifar10(source) -> bool:
    """torchvision's CIFAR-10, or a folder whose class folders (train/ and test/) are exactly CIFAR-10's."""
    return list(source.folders) == list(CIFAR10_CLASSES)


def job_settings(args, source, cls, teacher_info, precision) -> dict:
    """What config.json records as a run's settings, and Run.open compares: the flags (recipe values filled in),
    the class as an index and a name, the precision chosen, the data and the teacher by identity. Needs no image
    decoded and no teacher loaded, so a run folder can be checked before the slow work (check_run_folders)."""
    label = source.class_index(cls)
    settings = {k: v for k, v in vars(args).items() if k not in ("optimizer", "seeds")}
    return settings | {"cls": label, "class_name": source.classes[label], "precision": precision,
                       "data": data_identity(args), "data_dir": args.data_dir and str(Path(args.data_dir).resolve()),
                       "data_root": str(Path(args.data_root).resolve()), "teacher_sha256": teacher_info["sha256"],
                       "optimizer": args.optimizer.__name__}


def run_class(args, source, cls, teacher, teacher_info, device, precision, run: Run, finished_ok=False) -> dict:
    """Train and score one normal class into the run folder `run`; returns results.json's content. finished_ok:
    the same run already finished is reported, not refused (one job of many; see Run.open)."""
    started = time.time()
    saved = run.saved_config() if args.resume else None
    if saved and saved["settings"].get("class_name") != source.classes[class_index(source, cls)]:
        saved = None  # another class: Run.open refuses it below
    try:  # a saved run continues on exactly the images it recorded (new files in the folder are named, not used)
        data = data_as_recorded(source, cls, args.seed, args.limit, saved, args.data_dir)
    except ImagesChanged as e:
        raise RunError(f"cannot resume {run}: {e}; continued now, the run would mix two data sets (its saved epochs "
                       f"saw the images as they were): put them back as they were, or --overwrite to train afresh on "
                       f"the folder as it is") from None
    if args.select == "val-auroc" and not data.val_has_anomalies:
        raise RunError(f"--select val-auroc needs anomalous validation images, and train/ holds only the normal "
                       f"images of {data.class_name!r}: use --select final")
    if args.knn_k > len(data.train):
        raise RunError(f"--knn-k {args.knn_k} needs at least {args.knn_k} training images of class "
                       f"{data.class_name!r}; there are {len(data.train)}: lower --knn-k (0 skips the baseline)")
    settings = job_settings(args, source, cls, teacher_info, precision)
    resume = run.open(settings, args.resume, args.overwrite, finished_ok)
    changed = resume and teacher_changes(read_json(run.path / "config.json")["teacher"].get("config", {}),
                                         asdict(teacher.cfg))
    if changed:  # the same file, described otherwise (its config.json, --teacher-heads): another network
        raise RunError(f"cannot resume {run}: the teacher is described otherwise than when it was saved ({changed}): "
                       f"its config.json was changed or removed, or --teacher-heads differs; put it back as it was")
    done = run.results() if resume else None
    if done and done["epochs"] >= args.epochs:
        epochs = f"{done['epochs']} epoch" + "s" * (done["epochs"] != 1)
        print(f"class {done['cls']} ({done['class_name']}) already finished {epochs}: test AUROC "
              f"{done['test_auroc']:.4f} ({run}/results.json; --overwrite trains it again)")
        return done
    if done:
        run.keep_earlier(done["epochs"])  # --resume with more epochs extends a finished run
    print(data.summary())
    images = (saved or {}).get("images") if resume else None  # a resumed run keeps what it recorded first
    run.write_config({"settings": settings, "teacher": teacher_info,
                      "data": {"cifar10": is_cifar10(source), "classes": list(source.classes),
                               "test_only": list(source.test_only)} | data.record(),
                      "taps": asdict(taps_for(args.backbone, teacher)),
                      "student": asdict(student_config_for(args.backbone, teacher)),
                      "torch": torch.__version__, "device": str(device),
                      "images": images or image_record(source, data, args.data_dir)}, resume)
    try:
        figures = fit(args, data.to(device), teacher, device, precision, run, resume)
    except Stop as e:  # diverged or interrupted: config.json says so, for evaluate.py
        run.stopped(str(e))
        raise
    results = {"backbone": args.backbone, "cls": data.normal_class, "class_name": data.class_name,
               "teacher": teacher_info["name"], "teacher_saw_cifar10_labels": teacher_info["label_leak"], **figures,
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
    """'huggingface-dinov2 ViT, 12 blocks, width 384, 6 heads (config.json), patch 14, at 112 px': one short line,
    saying where the head count came from (a file beside the checkpoint, --teacher-heads, or assumed)."""
    c = teacher.cfg
    if hasattr(c, "patch_size"):
        said = getattr(teacher, "described", {}).get("heads", "assumed")
        registers = f", {c.registers} registers" if c.registers else ""
        return (f"{teacher.layout} ViT, {c.depth} blocks, width {c.width}, {c.heads} head{'s' * (c.heads != 1)} "
                f"({'assumed' if said.startswith('assumed') else said}), patch {c.patch_size}{registers}, at "
                f"{c.image_size} px")
    return f"VGG16, stage widths {' '.join(map(str, teacher.stage_channels))}"


def find_teacher(args) -> tuple:
    """Fetch (or find in the cache) the teacher file and say what it is, without loading it: (hub.Teacher,
    its identity for config.json: name, short name, preset, origin, path, sha256, label leak)."""
    found = resolve_teacher(args.teacher, args.cache_dir)
    info = {"name": args.teacher, "short_name": teacher_name(args.teacher, found.path, found.preset),
            "preset": found.preset, "origin": found.origin, "path": str(Path(found.path).resolve()),
            "sha256": sha256(found.path), "label_leak": bool(found.preset and PRESETS[found.preset].saw_cifar10_labels)}
    return found, info


def load_found_teacher(args, found, info: dict, device):
    """Load the teacher find_teacher found onto `device` and print what it is in a few short lines (an input
    mean/std other than its family's, a head count nothing beside the file says, what it may have seen); info
    gains its layout and config."""
    teacher = place(load_teacher(found.path, args.backbone, args.image_size, args.teacher_mean, args.teacher_std,
                                 args.teacher_heads), device, args.backbone)
    info |= {"layout": getattr(teacher, "layout", "torchvision"), "config": asdict(teacher.cfg)}
    name = args.teacher if len(args.teacher) <= 40 else ".../" + Path(args.teacher.split("?")[0]).name
    print(f"teacher: {name}: {describe(teacher)}")
    c, said = teacher.cfg, getattr(teacher, "described", {})
    if args.teacher_mean is not None or args.teacher_std is not None:  # given, or the recipe's
        print(f"  input mean {tuple(c.mean)}, std {tuple(c.std)}: set by --teacher-mean/--teacher-std or the recipe")
    elif "mean" in said:
        print(f"  input mean {tuple(c.mean)}, std {tuple(c.std)}: from {said['mean']}")
    if said.get("heads", "").startswith("assumed"):  # e.g. "assumed: 64 dims per head, as published ViTs have"
        print(f"  note: heads {said['heads']}; --teacher-heads N if this file has others")
    if info["label_leak"]:
        print("  note: fine-tuned on CIFAR-10 labels of all ten classes, it has seen the anomalies; label-free: "
              "--teacher dino-vitb16")
    elif classifier_classes(found.path) == 10:
        print("  note: it carries a 10-class classifier head: if fine-tuned on CIFAR-10, it has seen the anomalies")
    return teacher


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
    recipe = recipe_defaults(args)
    def folder(label, seed):
        if args.out:
            return Path(args.out) / f"s{seed}" if len(args.seeds) > 1 else Path(args.out)
        return default_run_dir(args.backbone, teacher_info["short_name"], data, label, seed, vars(args), recipe)
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


def recipe_defaults(args) -> dict:
    """Each flag's value when it is left out: the recipe's (RECIPES), or the flag's own default."""
    parser = cli.train_parser()
    return {name: parser.get_default(name) for name in vars(args)} | RECIPES[args.dataset][args.backbone]


def check_run_folders(args, source, jobs: list, teacher_info, precision):
    """Refuse, before the teacher is loaded and any image decoded, a command whose run folders cannot be used as
    asked (another configuration, an unfinished or a finished run; Run.check): the first such folder, in one line."""
    for job in jobs:
        settings = job_settings(Namespace(**vars(args), seed=job.seed), source, job.cls, teacher_info, precision)
        Run(job.run).check(settings, args.resume, args.overwrite, finished_ok=len(jobs) > 1)


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's RANK, WORLD_SIZE and LOCAL_RANK, or (0, 1, 0) for plain python."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def dist_timeout() -> timedelta:
    """How long a torchrun process waits for the others at start-up: KDAD_DIST_TIMEOUT minutes (default 30)."""
    value = os.environ.get("KDAD_DIST_TIMEOUT", "30")
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1
    if minutes <= 0:
        raise RunError(f"KDAD_DIST_TIMEOUT={value!r}: give the minutes torchrun's processes wait for each other at "
                       f"start-up as a positive number (default 30)")
    return timedelta(minutes=minutes)


def gather(obj, world: int, group=None) -> list:
    """Every process's `obj`, in rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def setup(args, local_rank: int, world: int):
    """Device, precision, teacher, data, jobs and table of this process; the run folders are checked before the
    teacher is loaded. Under torchrun the first process of each machine fetches the teacher and the data first and
    the others then read them from the cache, so no two processes write the same file; an error in any process
    stops all of them, each with its own line."""
    error, prepared = None, None
    for turn in (True, False):  # local rank 0 first, then the others
        if (local_rank == 0) == turn:
            try:
                device = pick_device(args.device, local_rank if world > 1 else None)
                precision = pick_precision(args.precision, device)
                set_numerics(precision, args.deterministic)  # TF32 only under autocast, cudnn.benchmark, ...
                found, info = find_teacher(args)
                source = open_source(args.data_dir, args.data_root, args.image_size, args.crop_pct, args.dataset)
                jobs, table = plan(args, source, info)
                check_run_folders(args, source, jobs, info, precision)  # before the slow work
                teacher = load_found_teacher(args, found, info, device)
                prepared = (device, precision, teacher, info, source, jobs, table)
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


def run_jobs(args, rank: int, world: int, local_rank: int, final=None) -> int:
    """Every job of this command; this process takes jobs rank, rank + world, ... With more than one job, a job
    that fails is reported and the others go on; the table covers the finished runs and names the failed ones.
    Under torchrun the first process gathers every process's finished runs (their results and config, over the
    `final` process group), so the table covers runs on other machines without a shared file system too."""
    device, precision, teacher, info, source, jobs, table = setup(args, local_rank, world)
    print(f"device: {device}, precision: {precision}" + (f", process {rank + 1}/{world}" if world > 1 else ""))
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
    if world > 1:
        print(f"process {rank + 1}/{world}: its jobs are done; waiting for the other processes"
              + ("" if rank else " (then this one writes the table)"))
    finished = [finished_run(job.run) for job in mine if world > 1 and (job.run / "results.json").is_file()]
    parts = gather((failed, finished), world, final)
    failed = [f for part, _ in parts for f in part]
    if table is not None and rank == 0:
        print_table(jobs, [r for _, part in parts for r in part], failed, table)
        for f in failed:
            print(f"failed: {f}")
        if failed:
            print(f"{len(failed)} of {len(jobs)} jobs failed; after fixing the cause, the same command with --resume "
                  f"does only what is missing")
    return 2 if failed else 0


def finished_run(run: Path) -> dict:
    return {"run": str(run), "config": read_json(run / "config.json"), "results": read_json(run / "results.json")}


def print_table(jobs: list[Job], finished: list[dict], failed: list[str], table: Path):
    """The table of every finished job: from its folder where this machine sees it, else from what its process
    sent (finished_run); jobs neither finished nor failed are named."""
    here = [job.run for job in jobs if (job.run / "results.json").is_file()]
    seen = {str(run) for run in here}
    elsewhere = [(r["config"], r["results"], r["run"]) for r in finished if r["run"] not in seen]
    if elsewhere:
        note(f"{len(elsewhere)} of the runs in the table finished on another machine; their folders are there: "
             f"{cli.named(name for _, _, name in elsewhere)}")
    sent = seen | {r["run"] for r in finished}
    unseen = [job.run for job in jobs if str(job.run) not in sent and not any(f.startswith(f"{job.run}:")
                                                                              for f in failed)]
    if unseen:
        note(f"the table leaves out {cli.counted(len(unseen), 'job', 'jobs')} no process reported: "
             f"{cli.named(unseen)}")
    if here or elsewhere:
        print(write_table(here, table, elsewhere))


def job_error(e: Exception, run: Path) -> str:
    """What went wrong with a job, in one line; the traceback of an unexpected error is kept in its run folder."""
    if isinstance(e, Stop):
        return f"stopped: {e}"
    if isinstance(e, OSError):
        return os_error_line(e)
    if isinstance(e, USER_ERRORS):
        return str(e)
    if isinstance(e, torch.OutOfMemoryError):
        return out_of_memory_line()
    try:
        write_text(run / "error.txt", "".join(traceback.format_exception(e)))
        return f"{type(e).__name__}: {e} (traceback in {run / 'error.txt'})"
    except OSError:  # no run folder yet, or no room for the traceback either
        return f"{type(e).__name__}: {e}"


def out_of_memory_line() -> str:
    """An out-of-memory error no step handled itself (training and scoring do: steps.out_of_memory,
    evaluate.over_images), in one line."""
    return ("out of GPU memory: lower --batch-size (training) or --eval-batch-size (scoring, the feature cache), or "
            "add --no-cache; other processes on the GPU (nvidia-smi) take memory too")


def main(argv=None) -> int:
    args = with_recipe(cli.train_args(argv))
    rank, world, local_rank = distributed()
    final = None
    try:
        if world > 1:  # gloo only hands out the job list and gathers results: the jobs themselves share nothing
            torch.distributed.init_process_group("gloo", timeout=dist_timeout())
            final = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=30))  # the wait at the end
        return run_jobs(args, rank, world, local_rank, final)
    except torch.OutOfMemoryError:
        print(f"error: {out_of_memory_line()}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stop as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130 if str(e).startswith("interrupted") else 3
    except OSError as e:  # an unwritable --out or cache folder, a full disk (WriteError: what, where, free space)
        print(f"error: {os_error_line(e)}" + (" (an unfinished run continues with --resume)"
                                              if isinstance(e, WriteError) else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loop (loading, scoring): files are only ever replaced whole
        print("stopped: interrupted; everything saved so far is intact (an unfinished run continues with --resume)"
              if WRITTEN else "stopped: interrupted before anything was written", file=sys.stderr)
        return 130
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
