"""The run record: what a run folder holds, how it is written, and the checks that keep a resumed run the same run.

    runs/<name>/
        config.json          every setting, the teacher's identity (sha256), the data, and each version of the code
                             that trained the run with the epochs it trained
        state.pt             the resumable training state: weights, optimiser, schedule, position in the epoch, RNG
        log.jsonl            one line per epoch: loss, validation loss on normal images, images/s
        student.safetensors  the chosen student (best.safetensors too with --select val-auroc)
        results.json         val/test AUROC and the run's figures, written once at the end

Every file is written to a temporary name and renamed into place (writes.write_atomically), so a crash or a
kill at any moment leaves the previous version or the new one, never half of one. A run folder is never reused
silently: another configuration, an unfinished run or a finished one is refused unless --resume or --overwrite says
what to do. train.py writes the record; evaluate.py reads it.
"""
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import torch

from checkpoint import save_tensors
from cli import RunError, counted, named, note
from layouts import IMAGENET_MEAN, IMAGENET_STD
from writes import write_atomically

# The settings that change what a run computes: a resumed run must share them. Paths are compared resolved, and
# only where they matter (`data` is the image folder, or "torchvision CIFAR-10" wherever it was downloaded); the
# device, the cache folder and the scoring batch size do not change the result.
RESULT_SETTINGS = ("backbone", "dataset", "cls", "data", "teacher_sha256", "teacher_mean", "teacher_std",
                   "batch_size", "lr", "lam", "image_size", "crop_pct", "limit", "seed", "select", "precision", "plain")
TORCHVISION_CIFAR10 = "torchvision CIFAR-10"


def write_text(path: Path, text: str):
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}): the run folder is damaged") from None


@cache
def code_version() -> dict:
    """The code this process runs: a digest of the project's modules (taken once, when first asked, so a file
    edited while a run trains does not change what the run reports) and `git describe`."""
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


## --------------------------------------------------------------------------------------------------------
## Names.

GENERIC_STEMS = {"model", "pytorch_model"}  # Hugging Face's file names say nothing about the model


def teacher_name(name: str, path: Path, preset: str | None) -> str:
    """A short name for the teacher in run names and titles: the preset, else the Hugging Face repository
    (models--org--repo in a hub cache path, or org/repo in a /resolve/ address), else the file's folder when the
    file is a generic model.safetensors, else the file's stem."""
    if preset:
        return preset
    if "/resolve/" in name:  # https://host/org/repo/resolve/<revision>/<file>
        return name.split("/resolve/")[0].rstrip("/").split("/")[-1]
    path = Path(path)
    for parent in path.parents:
        if parent.name.startswith("models--"):
            return parent.name.split("--")[-1]
    if path.stem in GENERIC_STEMS and path.parent.name:
        return path.parent.name
    return path.stem


def slug(name: str) -> str:
    """A name as it can stand in a folder name and be pasted into a shell: letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "_"


# What a default run folder's name adds, in this order, for each result-changing setting that differs from the
# recipe (a flag left out takes the recipe's value): so a quick check, the real run, or the same run with another
# batch size never share a folder. The device, --knn-k, --compile and the scoring batch size change no figure of
# the student and are left out; `precision` is the --precision flag (auto, the machine's choice, adds nothing).
NAME_PARTS = (("image_size", "{}px"), ("limit", "limit{}"), ("epochs", "{}ep"), ("batch_size", "batch{}"),
              ("lr", "lr{:g}"), ("lam", "lam{:g}"), ("select", "select-{}"), ("precision", "{}"), ("plain", "plain"))


def default_run_dir(backbone: str, teacher: str, data: str | None, cls: str, seed: int, settings: dict,
                    recipe: dict) -> Path:
    """runs/<backbone>-<teacher>[-<data folder>]-<class>-s<seed>, then each NAME_PARTS setting, and the teacher's
    mean/std (norm_part), where `settings` (the flags, recipe values filled in) differ from `recipe` (each name's
    value when its flag is left out), e.g. runs/vit-dino-cat-s0-32px-limit300-1ep-batch16."""
    parts = [slug(backbone), slug(teacher)] + ([slug(data)] if data else []) + [slug(cls), f"s{seed}"]
    for name, form in NAME_PARTS:
        if settings[name] != recipe.get(name):
            parts.append(form.format(settings[name]))
    norm = [tuple(settings[k] or ()) != tuple(recipe.get(k) or ()) for k in ("teacher_mean", "teacher_std")]
    if any(norm):
        parts.append(norm_part(settings["teacher_mean"], settings["teacher_std"]))
    return Path("runs") / slug("-".join(parts))


def norm_part(mean, std) -> str:
    """'imagenet-norm', or 'mean0.5-std0.5' (one value where all three channels agree), or
    'mean0.4_0.5_0.6-std0.2' ...; a side left to the teacher's family is left out."""
    if tuple(mean or ()) == IMAGENET_MEAN and tuple(std or ()) == IMAGENET_STD:
        return "imagenet-norm"
    def values(v):
        return f"{v[0]:g}" if len(set(v)) == 1 else "_".join(f"{x:g}" for x in v)
    return "-".join(f"{what}{values(v)}" for what, v in (("mean", mean), ("std", std)) if v)


def setting_change(key: str, there, now) -> str:
    """'--lr 5e-05 there, 0.0001 now': a setting as a user knows it (its flag, else what it is) in a saved run and
    in this command."""
    name = {"data": "data folder", "teacher_sha256": "teacher file (sha256)", "crop_pct": "crop_pct"}.get(
        key, "--" + key.replace("_", "-"))
    if key == "teacher_sha256":
        there, now = str(there)[:12], str(now)[:12]
    return f"{name} {there} there, {now} now"


## --------------------------------------------------------------------------------------------------------
## A run folder.

class Run:
    """One run folder (see the module docstring). `open` decides whether it starts afresh or continues; train.py
    then writes the config, one log line per epoch and the results through it."""

    def __init__(self, path):
        self.path = Path(path)
        self.config = None

    def __str__(self):
        return str(self.path)

    def check(self, settings: dict, resume: bool, overwrite: bool, finished_ok: bool = False) -> str:
        """What opening the folder will do, reading only: "new" (nothing saved), "overwrite", "restart" (--resume,
        nothing saved yet), "resume" or "finished" (finished_ok: one job of many whose same run finished with at
        least settings["epochs"]). Raises RunError where the folder cannot be used as asked: another
        configuration, or this run (finished or not) without --resume or --overwrite."""
        run = self.path
        if run.exists() and not run.is_dir():
            raise RunError(f"--out {run} is a file, not a folder: choose another --out")
        if not (run / "config.json").exists():
            return "restart" if resume else "new"
        if not_a_run(run):
            raise RunError(f"--out {run} is not a run folder: {not_a_run(run)}; choose another --out")
        if overwrite:
            return "overwrite"
        old = read_json(run / "config.json")["settings"]
        differ = [k for k in RESULT_SETTINGS if old.get(k) != settings.get(k)]
        said = "; ".join(setting_change(k, old.get(k), settings.get(k)) for k in differ)
        if differ and not resume:
            raise RunError(f"{run} already holds a run of another configuration ({said}): choose another --out, "
                           f"or --overwrite to replace it")
        if differ:
            raise RunError(f"cannot resume {run}: its settings differ ({said}): resume with the settings it was "
                           f"trained with, or choose another --out")
        if not resume:
            done = self.results()
            if finished_ok and done and done.get("epochs", 0) >= settings["epochs"]:
                return "finished"
            if done:
                n = done.get("epochs")
                raise RunError(f"{run} already holds this finished run ({n} epoch{'s' * (n != 1)}): to train it "
                               f"longer, --resume --out {run} with a larger --epochs; evaluate.py re-evaluates it; "
                               f"--overwrite trains it again")
            raise RunError(f"{run} already holds this run, unfinished: add --resume to continue it, or --overwrite "
                           f"to start again")
        return "resume" if (run / "state.pt").exists() else "restart"

    def open(self, settings: dict, resume: bool, overwrite: bool, finished_ok: bool = False) -> bool:
        """Refuse to reuse the folder silently (check), create it or clear it as asked; returns whether there is a
        saved state to continue from (a finished run's, for finished_ok, included)."""
        what, run = self.check(settings, resume, overwrite, finished_ok), self.path
        if what == "restart" and not (run / "config.json").exists():
            print(f"nothing saved in {run.resolve()} yet: starting this run from the beginning (to extend a run "
                  f"trained for another number of epochs, pass its folder with --out: the default name carries "
                  f"the epochs)")
        elif what == "restart":  # stopped before its first epoch ended: nothing to lose
            print(f"no saved state in {run} yet: starting this run from the beginning")
        elif what == "overwrite":
            print(f"overwriting the run in {run} (--overwrite)")
            for f in ("state.pt", "log.jsonl", "student.safetensors", "best.safetensors", "results.json"):
                (run / f).unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        return what in ("resume", "finished")

    def saved_config(self) -> dict | None:
        """config.json of the run saved here, or None (no run here yet, or a folder Run.open will refuse)."""
        has = (self.path / "config.json").is_file() and not not_a_run(self.path)
        return read_json(self.path / "config.json") if has else None

    def results(self) -> dict | None:
        """results.json of a finished run, or None."""
        return read_json(self.path / "results.json") if (self.path / "results.json").exists() else None

    def keep_earlier(self, epochs: int):
        """Before --resume extends a finished run: keep its results and student under names of their own."""
        for name in ("results.json", "student.safetensors"):
            if (self.path / name).exists():
                kept = self.path / name.replace(".", f"-{epochs}ep.", 1)
                os.replace(self.path / name, kept)
                print(f"kept the {epochs}-epoch {name} as {kept}")

    def write_config(self, config: dict, resume: bool):
        """config.json; a resumed run keeps the code history of the saved one, and a change of code is said."""
        saved = code_history(read_json(self.path / "config.json")) if resume else []
        now = code_version()
        if saved and not same_code(saved[-1], now):
            print(f"warning: the code changed since {self.path} was saved (sources {saved[-1]['sources_sha256']} -> "
                  f"{now['sources_sha256']}, git {saved[-1]['git']} -> {now['git']}); it continues with this code, "
                  f"and config.json keeps every version with the epochs it trained", file=sys.stderr)
        self.config = config | {"code": saved}
        if "images" in self.config:  # the long file lists go last
            self.config["images"] = self.config.pop("images")
        write_json(self.path / "config.json", self.config)

    def end_epoch(self, epoch: int, history: list[dict]):
        """After epoch `epoch` (1-based): the log, and the code that trained it in config.json's history."""
        write_text(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        code, now = self.config["code"], code_version()
        if code and same_code(code[-1], now):
            code[-1]["epochs"][1] = epoch
        else:
            code.append(now | {"epochs": [epoch, epoch]})
        write_json(self.path / "config.json", self.config)

    def write_results(self, results: dict):
        write_json(self.path / "results.json", results)

    def stopped(self, why: str):
        """config.json keeps why the run stopped early (a diverged student, Ctrl-C), for evaluate.py to say; the
        next write_config (--resume, --overwrite) drops it. A disk too full for it changes nothing else."""
        if self.config is not None:
            with contextlib.suppress(OSError):
                write_json(self.path / "config.json", self.config | {"stopped": why})


def code_history(config: dict) -> list[dict]:
    """config.json's code versions, oldest first, each with the [first, last] epochs it trained (runs written
    before the history existed hold one version and no epochs)."""
    code = config.get("code") or []
    return [code | {"epochs": [None, None]}] if isinstance(code, dict) else code


def same_code(a: dict, b: dict) -> bool:
    return a.get("sources_sha256") == b.get("sources_sha256")


# What the teacher's file does not hold but its folder (config.json) or a flag may say: a run records them
# (config.json "teacher"."config") and is only resumed or re-evaluated with the same.
DESCRIBED = ("heads", "eps", "mean", "std")


def teacher_changes(saved: dict, now: dict) -> str | None:
    """'heads 3 -> 1, eps 1e-05 -> 1e-12' between a run's recorded teacher config and the teacher loaded now (both
    as dataclasses.asdict of its config), or None. Fields a run of older code did not record are not compared."""
    def norm(v):
        return list(v) if isinstance(v, (tuple, list)) else v
    changed = [f"{k} {norm(saved[k])} -> {norm(now.get(k))}" for k in DESCRIBED
               if k in saved and norm(saved[k]) != norm(now.get(k))]
    return ", ".join(changed) or None


## --------------------------------------------------------------------------------------------------------
## The images a run was trained, validated and tested on (config.json "images"), and the same split again for
## --resume and evaluate.py: a folder that changed since is said, or refused, never scored or trained on silently.
##
##     "images": {"kind": "image folder", "root": <data folder>,
##                "splits": {"train" | "val" | "test": {"count": N, "sha256": <over the files' digests>,
##                                                      "files": {<path under root>: <sha256 of its bytes, 16 hex>}},
##                           (MVTec AD) "test" also "masks": {<ground_truth path>: <digest>}},
##                "folders": {<split/class folder>: {"count": N, "names_sha256": <over its sorted file names>}}}
##     torchvision's CIFAR-10: {"kind": "torchvision CIFAR-10", "splits": {part: {"count", "sha256" of the pixels}}}

PARTS = (("train", "train"), ("val", "train"), ("test", "test"))  # a run's split and the folder split it comes from
PART_NAMES = {"train": "training", "val": "validation", "test": "test"}


class ImagesChanged(ValueError):
    """A run's recorded images are gone or changed in its data folder; str(e) says which (counts, examples)."""


@cache
def _digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digest(path) -> str | None:
    """The first 16 hex digits of a file's sha256 (taken once per file version in a process); None when it
    cannot be read."""
    try:
        st = os.stat(path)
        return _digest(str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def digest_of(items) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]


def under(path, root) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def folder_names(folder, root) -> dict:
    """{<split>/<class folder> under root: its image files' names under root, sorted} of an ImageFolder: what
    decides its split."""
    out = {}
    for split in ("train", "test"):
        for f, label in zip(folder.files[split], folder.labels[split], strict=True):
            out.setdefault(under(Path(folder.root) / split / folder.folders[label], root), []).append(under(f, root))
    return {k: sorted(v) for k, v in out.items()}


def listing(names: dict) -> dict:
    return {k: {"count": len(v), "names_sha256": digest_of(v)} for k, v in names.items()}


def image_record(source, data, root) -> dict:
    """config.json's "images" for one-class data `data` drawn from `source` (data.py), file paths under `root` (the
    --data-dir)."""
    if data.train_files is None:  # torchvision's CIFAR-10: the pixels themselves
        return {"kind": TORCHVISION_CIFAR10, "splits": {part: {"count": len(x), "sha256": pixel_digest(x)} for
                                                         part, x in (("train", data.train), ("val", data.val),
                                                                     ("test", data.test))}}
    splits = {}
    for part, files in (("train", data.train_files), ("val", data.val_files), ("test", data.test_files)):
        digests = {under(f, root): file_digest(f) for f in files}
        splits[part] = {"count": len(files), "sha256": digest_of(f"{n} {d}" for n, d in digests.items()),
                        "files": digests}
    folder = source.category(data.class_name) if data.mvtec else source
    if data.mvtec:
        from mvtec import mask_file
        masks = [m for m in (mask_file(folder.root, f) for f in data.test_files) if m is not None]
        splits["test"]["masks"] = {under(m, root): file_digest(m) for m in masks}
    return {"kind": "image folder", "root": str(Path(root).resolve()), "splits": splits,
            "folders": listing(folder_names(folder, root))}


def pixel_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def data_as_recorded(source, cls, seed: int, limit, saved: dict | None, root):
    """The one-class data of a saved run (its config.json `saved`): exactly the images it recorded, by name,
    whatever was added to the folder since (named in a note); data.one_class_data for a run that recorded none
    (older code: said) or a new run (saved None). Raises ImagesChanged naming the recorded images that are gone or
    changed (and torchvision CIFAR-10 pixels that differ)."""
    from data import VAL_FRACTION, load_splits, one_class_data
    recorded = (saved or {}).get("images")
    if recorded is None:
        if saved is not None:
            note("this run recorded no fingerprint of its images (trained by older code): nothing can tell whether "
                 "they are the images it was trained on")
        return one_class_data(source, cls, seed, limit)
    if recorded["kind"] == TORCHVISION_CIFAR10:
        data = one_class_data(source, cls, seed, limit)
        differ = [f"{PART_NAMES[p]} images differ (sha256 of the pixels)" for p, x in
                  (("train", data.train), ("val", data.val), ("test", data.test))
                  if pixel_digest(x) != recorded["splits"][p]["sha256"]]
        if differ:
            raise ImagesChanged(f"torchvision's CIFAR-10 in {source.root} is not the one this run used: "
                                + ", ".join(differ))
        return data
    name = saved["settings"]["class_name"]
    mvtec = hasattr(source, "category")
    folder = source.category(name) if mvtec else source
    index = {split: {under(f, root): i for i, f in enumerate(folder.files[split])} for split in ("train", "test")}
    chosen, problems = {}, []
    for part, split in PARTS:
        files = recorded["splits"][part]["files"]
        here = [n for n in files if n in index[split]]
        gone = [n for n in files if n not in index[split]]
        changed = [n for n in here if file_digest(Path(root) / n) != files[n]]
        for what, names in (("gone", gone), ("changed", changed)):
            if names:
                problems.append(f"{PART_NAMES[part]}: {len(names)} of {len(files)} {what} (e.g. {names[0]})")
        chosen[part] = np.array([index[split][n] for n in here], dtype=np.int64)
    masks = recorded["splits"]["test"].get("masks", {})
    changed = [n for n, d in masks.items() if file_digest(Path(root) / n) != d]
    if changed:
        problems.append(f"masks: {len(changed)} of {len(masks)} changed or gone (e.g. {changed[0]})")
    if problems:
        raise ImagesChanged(f"the images this run recorded changed in {root} since: " + "; ".join(problems))
    normal = "good" if mvtec else name
    data = load_splits(folder, folder.classes.index(normal), chosen, VAL_FRACTION)
    if mvtec:
        data = source.with_masks(data, source.classes.index(name))
    if [len(data.train), len(data.val), len(data.test)] != [len(chosen[p]) for p, _ in PARTS]:
        raise ImagesChanged(f"some of the images this run recorded in {root} can no longer be read (see the notes)")
    say_folder_changes(recorded, folder_names(folder, root), root)
    return data


def say_folder_changes(recorded: dict, names: dict, root):
    """One note when the class folders a run drew its split from hold other files than they did (`names`: now, by
    folder_names), its own images being all there, unchanged: which folders, by how many, with an example of a new
    file where every file of the folder was the run's (elsewhere a file the run did not use may be an old one)."""
    then, now = recorded.get("folders", {}), listing(names)
    used = {n for part in recorded["splits"].values() for n in part["files"]}
    changes = []
    for key in sorted(then.keys() | now.keys()):
        a, b = then.get(key, {"count": 0}), now.get(key, {"count": 0})
        if a.get("names_sha256") == b.get("names_sha256"):
            continue
        new = [n for n in names.get(key, []) if n not in used]
        whole = a["count"] == sum(n.startswith(key + "/") for n in used)  # the folder was all the run's
        changes.append(f"{key} {a['count']} -> {b['count']} files" + (f" (e.g. {new[0]})" if whole and new else ""))
    if changes:
        total = {p: recorded["splits"][p]["count"] for p in ("train", "val", "test")}
        note(f"{root} changed since this run recorded it: {named(changes)}; the run's own {total['train']} training, "
             f"{total['val']} validation and {total['test']} test images are all there, unchanged, and only they are "
             f"used (its figures are this run's; the other files are not part of it)")


## --------------------------------------------------------------------------------------------------------
## state.pt: everything a run needs to continue exactly where it stopped.

def fresh_epoch() -> dict:
    """Progress within an epoch, saved with a mid-epoch state so a resumed epoch reports the whole epoch."""
    return {"step": 0, "losses": [], "seen": 0, "seconds": 0.0}


class Snapshots:
    """The resumable state in run/state.pt: weights, optimiser, schedule, fp16 loss scale, position, RNG, history."""

    def __init__(self, run: Run, student, opt, sched, scaler, device):
        self.run, self.path = run, run.path / "state.pt"
        self.student, self.opt, self.sched, self.scaler, self.device = student, opt, sched, scaler, device
        self.state = {"epoch": 0, "partial": fresh_epoch(), "history": [], "best": None, "rng": None}

    def resume(self, epochs: int):
        """Continue from state.pt: load it, check it is not past `epochs` (RunError), and say where it stands."""
        self.load()
        at = self.state["epoch"]
        if at > epochs:
            raise RunError(f"{self.path} is at epoch {at}, past --epochs {epochs}: resume with --epochs {at} or more")
        print(f"resuming {self.run}: " + (f"all {at} epochs trained, scoring" if at == epochs else
                                          f"at epoch {at + 1}, step {self.state['partial']['step']}"))

    def load(self):
        try:  # to the CPU first: load_state_dict puts each tensor where its parameter lives
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            self.student.load_state_dict(saved["student"])
            self.opt.load_state_dict(saved["optimizer"])
            self.sched.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):  # fp16 runs: the loss scale and its count of good steps
                self.scaler.load_state_dict(saved["scaler"])
            self.state = {k: saved[k] for k in self.state}
        except Exception as e:  # not written by this code: a finished state.pt is never half-written
            raise RunError(f"{self.path} is unreadable ({type(e).__name__}): use --overwrite to start again") from None

    def save(self, epoch: int, partial: dict):
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        self.state |= {"epoch": epoch, "partial": partial, "rng": rng}
        state = self.state | {"student": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                              "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}
        write_atomically(self.path, lambda tmp: torch.save(state, tmp))

    def end_epoch(self, epoch: int, record: dict):
        """After epoch `epoch` (1-based): its figures into the history and log.jsonl, the state into state.pt, and,
        when record has a validation AUROC better than any before, the student into best.safetensors."""
        best = self.state["best"]
        if "val_auroc" in record and (best is None or record["val_auroc"] > best["val_auroc"]):
            self.state["best"] = {"epoch": epoch, "val_auroc": record["val_auroc"]}
            save_tensors(self.student.state_dict(), self.run.path / "best.safetensors")
        self.state["history"].append(record)
        self.save(epoch, fresh_epoch())
        self.run.end_epoch(epoch, self.state["history"])

    def restore_rng(self, epoch_seed: int):
        """Dropout draws from the global generator: seed it at the start of an epoch, or restore it mid-epoch."""
        if self.state["partial"]["step"] == 0:
            torch.manual_seed(epoch_seed)
            return
        torch.set_rng_state(self.state["rng"]["cpu"])
        if "cuda" in self.state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state["rng"]["cuda"], self.device)

    def kept(self, interrupted: bool) -> str:
        """What an early stop leaves behind, for its message."""
        resume = "; continue it with the same command and --resume"
        if interrupted:
            return f"saved a resumable state in {self.path}{resume}"
        if self.path.exists():
            e, step = self.state["epoch"], self.state["partial"]["step"]
            where = f"epoch {e + 1}, step {step}" if step else f"end of epoch {e}"
            return f"the last good state ({where}) is kept in {self.path}"
        return "nothing was saved yet"


## --------------------------------------------------------------------------------------------------------
## Finding finished runs (evaluate.py, tables).

# what makes a config.json a run's (every version of train.py wrote these), and what re-evaluating one reads
RUN_KEYS = {"settings": ("backbone", "cls", "seed", "image_size"), "teacher": ("sha256",)}
EVALUATE_KEYS = {"settings": ("lam", "limit", "data_dir", "data_root", "precision"), "teacher": ("path", "config")}


def not_a_run(folder, keys=RUN_KEYS) -> str | None:
    """Why `folder`, which holds a config.json, is no run folder train.py wrote (in words, for a note or an error):
    its config.json is unreadable, or describes something else (a Hugging Face or timm model folder beside its
    weights); None for a run."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"its config.json is unreadable ({' '.join(str(e).split())[:80]})"
    if not isinstance(cfg, dict):
        return f"its config.json holds a {type(cfg).__name__}, not a run's settings"
    if "model_type" in cfg or "architectures" in cfg:
        return f"a Hugging Face model folder (config.json of a {cfg.get('model_type', 'model')!r} model)"
    if "architecture" in cfg and "pretrained_cfg" in cfg:
        return f"a timm model folder (config.json of {cfg['architecture']!r})"
    missing = [f"{part}.{k}" if k else part for part, need in keys.items()
               for k in ([None] if not isinstance(cfg.get(part), dict) else [k for k in need if k not in cfg[part]])]
    if missing:
        return f"its config.json has no {', '.join(missing[:3])}: not a run train.py wrote, or a damaged one"
    return None


def read_run_config(folder, keys=RUN_KEYS) -> dict:
    """A run's config.json, checked to be one and to hold `keys` (RunError with one line otherwise, see
    not_a_run)."""
    why = not_a_run(folder) or not_a_run(folder, keys)
    if why:
        raise RunError(f"{folder} is not a run folder: {why}; pass a folder written by train.py")
    return read_json(Path(folder) / "config.json")


def run_folders(paths) -> list[Path]:
    """The run folders among `paths`, each once: a folder with a run's config.json is a run; any other folder
    stands for every run folder below it, at any depth (a --cls all folder, runs/ itself). What is not a run is
    named in one note and left out: files among the paths (a table.md caught by `runs/*`) and folders whose
    config.json is no run's (a teacher's Hugging Face folder, an unreadable file; see not_a_run). Raises RunError
    for a path that does not exist or holds no run."""
    found, files, others = [], [], []
    for p in map(Path, paths):
        if not p.exists():
            raise RunError(f"{p} not found: pass a run folder written by train.py")
        if p.is_file():
            files.append(p)
            continue
        if (p / "config.json").is_file() and not not_a_run(p):
            found.append(p)
            continue
        inner = sorted(q.parent for q in p.rglob("config.json") if q.parent != p)
        if (p / "config.json").is_file():
            if not inner:
                raise RunError(f"{p} is not a run folder: {not_a_run(p)}; pass a folder written by train.py")
            inner.insert(0, p)
        if not inner:
            raise RunError(f"{p} is not a run folder (no config.json in it or in its subfolders): pass a folder "
                           f"written by train.py")
        for q in inner:
            why = not_a_run(q)
            if why:
                others.append(f"{q} ({why})")
            else:
                found.append(q)
    if files:
        print(f"note: left out {len(files)} file{'s' * (len(files) > 1)} that {'are' if len(files) > 1 else 'is'} "
              f"no run folder: {', '.join(map(str, files[:5]))}", file=sys.stderr)
    if others:
        note(f"left out {counted(len(others), 'folder that is not a run', 'folders that are not runs')}: "
             f"{named(others)}")
    unique = list({p.resolve(): p for p in found}.values())  # the same folder given twice counts once
    if not unique:
        raise RunError(f"no run folder among {', '.join(map(str, paths))}: pass folders written by train.py")
    return unique
