"""The run record: what a run folder holds, how it is written, and the checks that keep a resumed run the same run.

    runs/<name>/
        config.json          every setting, the teacher's identity (sha256), the data, and each version of the code
                             that trained the run with the epochs it trained
        state.pt             the resumable training state: weights, optimiser, schedule, position in the epoch, RNG
        log.jsonl            one line per epoch: loss, validation loss on normal images, images/s
        student.safetensors  the chosen student (best.safetensors too with --select val-auroc)
        results.json         val/test AUROC and the run's figures, written once at the end

Every file is written to a temporary name and renamed into place (checkpoint.write_atomically), so a crash or a
kill at any moment leaves the previous version or the new one, never half of one. A run folder is never reused
silently: another configuration, an unfinished run or a finished one is refused unless --resume or --overwrite says
what to do. train.py writes the record; evaluate.py reads it.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch

from checkpoint import save_tensors, write_atomically
from cli import RunError
from layouts import IMAGENET_MEAN, IMAGENET_STD

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
        if overwrite:
            return "overwrite"
        old = read_json(run / "config.json")["settings"]
        differ = [k for k in RESULT_SETTINGS if old.get(k) != settings.get(k)]
        if differ and not resume:
            raise RunError(f"{run} already holds a run of another configuration ({', '.join(differ)} differ): "
                           f"choose another --out, or --overwrite to replace it")
        if differ:
            raise RunError(f"cannot resume {run}: its settings differ in {', '.join(differ)} "
                           f"({', '.join(f'{k}={old.get(k)!r}' for k in differ)})")
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


def code_history(config: dict) -> list[dict]:
    """config.json's code versions, oldest first, each with the [first, last] epochs it trained (runs written
    before the history existed hold one version and no epochs)."""
    code = config.get("code") or []
    return [code | {"epochs": [None, None]}] if isinstance(code, dict) else code


def same_code(a: dict, b: dict) -> bool:
    return a.get("sources_sha256") == b.get("sources_sha256")


## --------------------------------------------------------------------------------------------------------
## state.pt: everything a run needs to continue exactly where it stopped.

def fresh_epoch() -> dict:
    """Progress within an epoch, saved with a mid-epoch state so a resumed epoch reports the whole epoch."""
    return {"step": 0, "losses": [], "seen": 0, "seconds": 0.0}


class Snapshots:
    """The resumable state in run/state.pt: weights, optimiser, schedule, position, RNG, history."""

    def __init__(self, run: Run, student, opt, sched, device):
        self.run, self.path = run, run.path / "state.pt"
        self.student, self.opt, self.sched, self.device = student, opt, sched, device
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
            return f"the last good state ({where}) is kept in {self.path}{resume}"
        return "nothing was saved yet"


## --------------------------------------------------------------------------------------------------------
## Finding finished runs (evaluate.py, tables).

def run_folders(paths) -> list[Path]:
    """The run folders among `paths`, each once: a folder with a config.json is a run; a folder without one
    stands for every run folder below it, at any depth (a --cls all folder, runs/ itself). Files among the paths
    (a table.md caught by `runs/*`) are named and left out. Raises RunError for a path that does not exist or
    holds no run."""
    found, files = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise RunError(f"{p} not found: pass a run folder written by train.py")
        if p.is_file():
            files.append(p)
        elif (p / "config.json").is_file():
            found.append(p)
        else:
            inner = sorted(q.parent for q in p.rglob("config.json"))
            if not inner:
                raise RunError(f"{p} is not a run folder (no config.json in it or in its subfolders): pass a folder "
                               f"written by train.py")
            found += inner
    if files:
        print(f"note: left out {len(files)} file{'s' * (len(files) > 1)} that {'are' if len(files) > 1 else 'is'} "
              f"no run folder: {', '.join(map(str, files[:5]))}", file=sys.stderr)
    unique = list({p.resolve(): p for p in found}.values())  # the same folder given twice counts once
    if not unique:
        raise RunError(f"no run folder among {', '.join(map(str, paths))}: pass folders written by train.py")
    return unique
