"""Bad input gets one clear line and a non-zero exit; an interrupted run loses nothing and resumes exactly."""
import argparse
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import distill
import evaluate
import knn
import train
import writes
from checkpoint import read_tensors
from helpers import image_folder, save, torchvision_vit, vgg16_file, vit_teacher_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {"data": image_folder(d / "data"), "vit": vit_teacher_file(d / "vit.safetensors"),
            "vgg": vgg16_file(d / "vgg.safetensors"), "dir": d,
            "small": image_folder(d / "small", n_train=10, n_test=4)}  # 9 bee images: 3 steps of 4 an epoch


def argv_for(files, out, backbone="vit", *extra, teacher=None, data=None, cls="bee"):
    """Pinned to the CPU, where an interrupted and resumed run ends bitwise equal to an uninterrupted one (on a GPU
    that needs --deterministic: tests/test_devices.py)."""
    return ["--backbone", backbone, "--cls", cls, "--teacher", str(teacher or files[backbone]),
            "--data-dir", str(data or files["data"]), "--image-size", "32", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--out", str(out), *extra]


def cli(argv, main=train.main) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        return e.code


def fails(capsys, argv, *fragments, code=2, main=train.main):
    """The command exits with `code` and its last stderr line is one clear message holding every fragment."""
    assert cli(argv, main) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for f in fragments:
        assert f in last, last
    return last


## --------------------------------------------------------------------------------------------------------
## Teacher files.

def teacher_case(files, kind) -> Path:
    d = files["dir"] / "bad"
    d.mkdir(exist_ok=True)
    path = d / f"{kind}.safetensors"
    if kind == "random":
        path.write_bytes(random.Random(0).randbytes(5000))
    elif kind == "pickle":
        torch.save(torchvision_vit().state_dict(), path)
    elif kind == "html":
        path.write_text("<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head></html>\n" * 30)
    elif kind == "truncated":
        data = Path(files["vit"]).read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "resnet":
        save(torchvision.models.resnet18().state_dict(), path)
    elif kind == "width":  # width 132 splits into 2 heads of 66, but not into the student's 8 heads
        save(torchvision_vit(hidden_dim=132, num_heads=2).state_dict(), path)
    elif kind == "tokens":  # 18 position embeddings: no square grid of patches plus CLS
        sd = torchvision_vit().state_dict()
        sd["encoder.pos_embedding"] = torch.zeros(1, 18, 128)
        save(sd, path)
    elif kind == "nan":
        sd = torchvision_vit().state_dict()
        sd["encoder.layers.encoder_layer_0.mlp.0.weight"][3, 3] = float("inf")
        save(sd, path)
    return path


@pytest.mark.parametrize("kind, backbone, fragments", [
    ("missing", "vit", ["teacher not found", "neither a file nor a preset"]),
    ("random", "vit", ["not a safetensors file", "check the path or download it again"]),
    ("pickle", "vit", ["PyTorch pickle", "python checkpoint.py convert"]),
    ("html", "vgg", ["HTML/XML page", "failed download"]),
    ("truncated", "vit", ["truncated", "download it again"]),
    ("resnet", "vit", ["not a ViT checkpoint"]),
    ("resnet", "vgg", ["not a VGG16 checkpoint"]),
    ("width", "vit", ["width 132 cannot be split into 8 student heads"]),
    ("tokens", "vit", ["18 tokens", "not a square grid"]),
    ("nan", "vit", ["non-finite values", "encoder_layer_0.mlp.0.weight"]),
])
def test_bad_teacher_files(files, tmp_path, capsys, kind, backbone, fragments):
    path = tmp_path / "nope.safetensors" if kind == "missing" else teacher_case(files, kind)
    line = fails(capsys, argv_for(files, tmp_path / "r", backbone, teacher=path), *fragments)
    assert line.startswith("error: ")


def test_teacher_of_the_wrong_family(files, tmp_path, capsys):
    fails(capsys, argv_for(files, tmp_path / "a", "vit", teacher=files["vgg"]), "VGG checkpoint, not a ViT",
          "--backbone vgg")
    fails(capsys, argv_for(files, tmp_path / "b", "vgg", teacher=files["vit"]), "ViT checkpoint, not VGG16",
          "--backbone vit")


def test_image_size_not_a_multiple_of_the_patch(files, tmp_path, capsys):
    argv = argv_for(files, tmp_path / "r") + ["--image-size", "36"]
    fails(capsys, argv, "image size 36 is not a multiple of the teacher's patch size 8", "--image-size 32")


## --------------------------------------------------------------------------------------------------------
## Data.

def test_data_folder_problems(files, tmp_path, capsys):
    fails(capsys, argv_for(files, tmp_path / "r", data=tmp_path / "absent"), "data folder not found", "--data-dir")
    (tmp_path / "empty").mkdir()
    fails(capsys, argv_for(files, tmp_path / "r", data=tmp_path / "empty"), "has no train/ folder")
    no_test = tmp_path / "no_test"
    shutil.copytree(Path(files["data"]) / "train", no_test / "train")
    fails(capsys, argv_for(files, tmp_path / "r", data=no_test), "has no test/ folder")
    (no_test / "test" / "bee").mkdir(parents=True)
    fails(capsys, argv_for(files, tmp_path / "r", data=no_test), "class 'bee' has no images in test/")
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    (tmp_path / "no_classes" / "test").mkdir()
    fails(capsys, argv_for(files, tmp_path / "r", data=tmp_path / "no_classes"), "has no class folders")


def test_bad_class(files, tmp_path, capsys):
    fails(capsys, argv_for(files, tmp_path / "r", cls="horse"), "no class 'horse'", "0=ant, 1=bee, 2=cow")
    fails(capsys, argv_for(files, tmp_path / "r", cls="10"), "no class '10'", "index 0-2")


def test_unreadable_and_non_image_files_are_skipped_with_a_count(files, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    (data / "train" / "bee" / "notes.txt").write_text("not an image")
    (data / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    assert cli(argv_for(files, tmp_path / "r", data=data)) == 0
    captured = capsys.readouterr()
    assert "train: skipped 1 file that is not an image" in captured.err
    assert "train: skipped 1 unreadable image file" in captured.err
    assert "train 27 normal images" in captured.out  # 30 readable bee images, 10% held out


def test_limit_too_small(files, tmp_path, capsys):
    fails(capsys, argv_for(files, tmp_path / "r") + ["--limit", "1"], "--limit must be at least 2")


## --------------------------------------------------------------------------------------------------------
## Settings.

@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--batch-size", "-4"), ("--lr", "0"),
                                         ("--image-size", "0")])
def test_non_positive_settings(files, tmp_path, capsys, flag, value):
    fails(capsys, argv_for(files, tmp_path / "r") + [flag, value], f"{flag} must be positive")


@pytest.mark.parametrize("extra, said", [
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["--lam", "nan"], "argument --lam: 'nan' is not a finite number"),
    (["--teacher-mean", "0.5", "nan", "0.5"], "argument --teacher-mean: 'nan' is not a finite number"),
    (["--teacher-std", "0", "0", "0"], "--teacher-std must be positive"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--seed", "0", "4294967296"], "--seed must be between 0 and 4294967295")])
def test_impossible_values_are_a_bad_flag_not_a_diverged_run(files, tmp_path, capsys, extra, said):
    fails(capsys, argv_for(files, tmp_path / "r") + extra, said, "--help")
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(files, tmp_path, capsys):
    fails(capsys, argv_for(files, tmp_path / "r") + ["--device", "cuda"], "no usable CUDA GPU", "--device cpu")


def test_bad_choice_is_one_line(files, tmp_path, capsys):
    fails(capsys, ["--backbone", "resnet", "--cls", "3"], "invalid choice: 'resnet'", "--help")


## --------------------------------------------------------------------------------------------------------
## Run folders.

def test_existing_run_folder_is_not_clobbered(files, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(argv_for(files, out)) == 0
    results = (out / "results.json").read_bytes()
    fails(capsys, argv_for(files, out) + ["--lr", "1e-4"], "another configuration (--lr 5e-05 there, 0.0001 now)",
          "--overwrite")
    fails(capsys, argv_for(files, out), "this finished run", "--overwrite trains it again")
    assert (out / "results.json").read_bytes() == results
    assert cli(argv_for(files, out, "vit", "--resume")) == 0  # finished: reports, changes nothing
    assert "already finished 1 epoch:" in capsys.readouterr().out
    assert (out / "results.json").read_bytes() == results
    assert cli(argv_for(files, out) + ["--lr", "1e-4", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["lr"] == 1e-4
    assert cli(argv_for(files, tmp_path / "new", "vit", "--resume")) == 0  # nothing saved yet: starts it
    assert "starting this run from the beginning" in capsys.readouterr().out


def test_out_is_a_file_and_bad_devices(files, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    fails(capsys, argv_for(files, tmp_path / "f"), "is a file, not a folder")
    fails(capsys, argv_for(files, tmp_path / "r") + ["--device", "mps"], "unknown device 'mps'")
    fails(capsys, argv_for(files, tmp_path / "r") + ["--device", "gpu0"], "unknown device 'gpu0'")
    fails(capsys, ["--batch-size", "0", str(tmp_path)], "--batch-size must be positive", main=evaluate.main)


def test_unfinished_run_asks_for_resume(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    interrupt_at(monkeypatch, 3)
    assert cli(argv_for(files, out, "vit", "--batch-size", "4")) == 130
    monkeypatch.undo()
    fails(capsys, argv_for(files, out, "vit", "--batch-size", "4"), "unfinished", "--resume")


## --------------------------------------------------------------------------------------------------------
## Interruptions.

def interrupt_at(monkeypatch, call: int):
    """Deliver a real SIGINT to this process just before training step number `call` (1-based)."""
    real, count = train.train_step, {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", step)


def weights(run):
    return read_tensors(Path(run) / "student.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backbone", ["vit", "vgg"])
def test_ctrl_c_mid_epoch_then_resume_equals_an_uninterrupted_run(files, tmp_path, capsys, monkeypatch, backbone):
    extra = ["--epochs", "3", "--batch-size", "4"]  # 9 images: 3 steps per epoch
    assert cli(argv_for(files, tmp_path / "straight", backbone, *extra, data=files["small"])) == 0
    out = tmp_path / "stopped"
    interrupt_at(monkeypatch, 5)  # epoch 2, step 2
    last = fails(capsys, argv_for(files, out, backbone, *extra, data=files["small"]), "interrupted at epoch 2, step 2",
                 "saved a resumable state", "--resume", code=130)
    assert str(out / "state.pt") in last
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert cli(argv_for(files, out, backbone, *extra, "--resume", data=files["small"])) == 0
    assert same_weights(weights(tmp_path / "straight"), weights(out))
    losses = [[json.loads(line)["loss"] for line in (p / "log.jsonl").read_text().splitlines()]
              for p in (tmp_path / "straight", out)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # the resumed epoch reports the whole epoch


def test_ctrl_c_on_the_last_step_of_an_epoch(files, tmp_path, capsys, monkeypatch):
    extra = ["--epochs", "3", "--batch-size", "4"]  # 9 images: 3 steps per epoch
    assert cli(argv_for(files, tmp_path / "straight", "vit", *extra, data=files["small"])) == 0
    out = tmp_path / "stopped"
    interrupt_at(monkeypatch, 3)  # the last step of epoch 1: the epoch ends, is saved, then the run stops
    fails(capsys, argv_for(files, out, "vit", *extra, data=files["small"]), "interrupted after epoch 1", "--resume",
          code=130)
    monkeypatch.undo()
    assert cli(argv_for(files, out, "vit", *extra, "--resume", data=files["small"])) == 0
    assert same_weights(weights(tmp_path / "straight"), weights(out))


def test_all_classes_resume_after_an_interruption(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "all"
    interrupt_at(monkeypatch, 7)  # one epoch of 27 images, batch 8: steps 1-4 are class 0, 5-8 class 1
    fails(capsys, argv_for(files, out, "vit", "--batch-size", "8", cls="all"), "interrupted at epoch 1, step 3",
          code=130)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["0-ant", "1-bee"]
    assert cli(argv_for(files, out, "vit", "--batch-size", "8", "--resume", cls="all")) == 0
    printed = capsys.readouterr().out
    assert "class 0 (ant) already finished" in printed and "resuming" in printed and "| mean |" in printed
    assert all((out / c / "results.json").is_file() for c in ("0-ant", "1-bee", "2-cow"))


def test_the_last_progress_line_counts_the_steps_the_stop_message_counts(monkeypatch):
    """A resumed epoch (7 steps, 3 done before) interrupted during its 5th step: the last progress line written
    to a log says 5/7, as the message says step 5."""
    import io
    from argparse import Namespace
    from functools import partial

    import cli as cli_module
    import steps
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(steps, "progress", partial(cli_module.progress, interval=0))

    class Snaps:
        state = {"partial": {"step": 3, "losses": [1.0] * 3, "seen": 6, "seconds": 1.0}}

        def save(self, epoch, partial):
            pass

        def kept(self, interrupted):
            return "saved"
    stop = steps.Interrupt()
    epoch = steps.EpochSteps(((torch.arange(2), None) for _ in range(4)), 14, Namespace(batch_size=2, epochs=1), 0,
                             Snaps(), stop)
    with pytest.raises(steps.Stop, match="interrupted at epoch 1, step 5;"):
        for step, _ in enumerate(epoch, start=4):
            epoch.log(torch.tensor(1.0))
            stop.requested = step == 5
    assert " 5/7 " in log.getvalue().strip().splitlines()[-1]


def test_non_finite_loss_stops_and_keeps_the_last_good_state(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    real, count = train.train_step, {"n": 0}

    def step(kdad, opt, amp, scaler, idx, x, cache=None):
        count["n"] += 1
        loss = real(kdad, opt, amp, scaler, idx, x, cache)
        return loss * float("nan") if count["n"] >= 9 else loss  # epoch 2 (7 steps per epoch), step 2
    monkeypatch.setattr(train, "train_step", step)
    fails(capsys, argv_for(files, out, "vit", "--epochs", "3", "--batch-size", "4"),
          "non-finite loss at epoch 2, step 2", "last good state (end of epoch 1)", code=3)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["student"].values()
                                       if v.is_floating_point())
    assert not (out / "results.json").exists()


def poisoned_scores(monkeypatch, train_taps: bool, after_calls=0):
    """KDAD.score gives inf for every image of its calls with train_taps (the validation loss) or without (the
    anomaly scores), after the first `after_calls` such calls: a student that diverged without a non-finite
    training loss."""
    real, count = distill.KDAD.score, {"n": 0}

    def score(self, x, taps=False, *cached):
        out = real(self, x, taps, *cached)
        if taps == train_taps:
            count["n"] += 1
            return out * float("inf") if count["n"] > after_calls else out
        return out
    monkeypatch.setattr(distill.KDAD, "score", score)


def test_non_finite_validation_loss_stops_and_keeps_the_last_good_state(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    poisoned_scores(monkeypatch, train_taps=True, after_calls=1)  # epoch 1 validates fine, epoch 2 does not
    fails(capsys, argv_for(files, out, "vit", "--epochs", "3"), "stopped: non-finite validation loss (3 of 3",
          "at epoch 2", "try a lower --lr", "last good state (end of epoch 1)", code=3)
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1
    assert len((out / "log.jsonl").read_text().splitlines()) == 1 and not (out / "results.json").exists()
    monkeypatch.undo()
    fails(capsys, [str(out)], "no student.safetensors", "stopped with non-finite validation loss", "lower --lr",
          main=evaluate.main)


def test_non_finite_final_scores_or_features_stop_with_one_line(files, tmp_path, capsys, monkeypatch):
    poisoned_scores(monkeypatch, train_taps=False)  # the validation loss is fine, the final scores are not
    out = tmp_path / "r"
    fails(capsys, argv_for(files, out), "non-finite validation scores (9 of 9 NaN/inf) in the final scoring",
          "no student.safetensors or results.json written", code=3)
    assert (out / "state.pt").is_file() and not (out / "student.safetensors").exists()
    features = [torch.ones(3, 4), torch.full((2, 4), float("nan"))]  # the teacher's, e.g. overflowing in bf16
    with pytest.raises(evaluate.NonFinite, match=r"non-finite teacher image features \(kNN baseline\) \(8 of 20"):
        knn.baseline(None, argparse.Namespace(val=torch.zeros(3)), None, None, 2, features, 8)


def test_evaluate_a_student_that_gives_non_finite_scores(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert cli(argv_for(files, out, "vit", "--knn-k", "0")) == 0
    poisoned_scores(monkeypatch, train_taps=False)  # e.g. evaluated at a precision where it overflows
    fails(capsys, [str(out)], "non-finite validation scores (9 of 9 NaN/inf)", "--precision fp32", code=3,
          main=evaluate.main)
    nan_map = np.zeros((2, 4, 4))
    nan_map[1, 2, 2] = float("nan")
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, :2] = True
    for metric in (evaluate.pixel_auroc, evaluate.pro_score):
        with pytest.raises(evaluate.NonFinite, match=r"non-finite anomaly-map pixels \(1 of 32 NaN/inf\)"):
            metric(nan_map, masks)


def test_crash_while_saving_leaves_the_previous_state_intact(files, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert cli(argv_for(files, out, "vit", "--epochs", "1")) == 0
    before = (out / "state.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dying_save)
    assert cli(argv_for(files, out, "vit", "--epochs", "2", "--resume")) == 130
    assert (out / "state.pt").read_bytes() == before


def test_sigint_and_sigkill_of_a_real_process(files, tmp_path):
    """Ctrl-C ends the process with one line and a resumable state; SIGKILL at any moment leaves the last
    state.pt loadable; --resume then gives exactly the weights of an uninterrupted run."""
    out = tmp_path / "killed"
    def argv_of(out, *extra):  # 9 images in batches of 2: 5 steps an epoch
        return argv_for(files, out, "vit", "--batch-size", "2", "--knn-k", "0", *extra, data=files["small"])
    argv = [sys.executable, str(ROOT / "train.py"), *argv_of(out)]
    argv[argv.index("--epochs") + 1] = "200"

    def start_and_wait_for_epochs(n):
        # no timing in the assertions: the deadline only keeps a hung process from hanging the suite
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            log = out / "log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= n:
                return proc
            time.sleep(0.02)
        proc.kill()
        pytest.fail(f"the run did not get going: {proc.communicate()[1][-500:]}")

    proc = start_and_wait_for_epochs(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=900)
    last = err.strip().splitlines()[-1]  # progress lines may come before it, on a slow machine
    assert proc.returncode == 130 and "Traceback" not in err, err
    # where the signal lands (mid-epoch, or during an epoch's last step or validation) depends on the machine's
    # speed; both are exact and resumable, and each is tested deterministically by the interrupt_at tests above
    assert re.match(r"stopped: interrupted (at epoch \d+, step \d+|after epoch \d+); saved a resumable state", last)
    assert "--resume" in last

    argv.append("--resume")
    proc = start_and_wait_for_epochs(3)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    epoch = torch.load(out / "state.pt", weights_only=True)["epoch"]
    assert epoch >= 3 - 1  # the state written before the kill is whole and loadable

    # finish the killed run at epoch + 1 and compare with a run that was never interrupted
    resume = argv_of(out, "--resume")
    resume[resume.index("--epochs") + 1] = str(epoch + 1)
    assert cli(resume) == 0
    straight = argv_of(tmp_path / "straight")
    straight[straight.index("--epochs") + 1] = str(epoch + 1)
    assert cli(straight) == 0
    assert same_weights(weights(out), weights(tmp_path / "straight"))


## --------------------------------------------------------------------------------------------------------
## evaluate.py.

def test_evaluate_refuses_what_it_cannot_trust(files, tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    fails(capsys, [str(tmp_path / "notarun")], "not a run folder", main=evaluate.main)
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(files["vit"], teacher)
    out = tmp_path / "r"
    assert cli(argv_for(files, out, teacher=teacher)) == 0
    sd = read_tensors(teacher)
    sd["class_token"] += 1
    save(sd, teacher)
    fails(capsys, [str(out)], "has changed since training", "sha256", main=evaluate.main)
    fails(capsys, ["--table", str(tmp_path / "notarun")], "is not a run folder", main=evaluate.main)


## --------------------------------------------------------------------------------------------------------
## A full disk (or a read-only folder) while saving: one line, nothing half-written, nothing earlier lost.

def no_room(kind: str):
    """What each writer raises when the disk is full, as measured on a 64 kB tmpfs: torch.save's RuntimeError,
    safetensors' SafetensorError, a plain OSError (json, logs, tables, plots)."""
    from safetensors import SafetensorError
    if kind == "torch":
        return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    if kind == "safetensors":
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then(error):
    """A writer that writes half a file to the temporary name it is given, then fails with `error`."""
    def write(tmp):
        Path(tmp).write_bytes(b"x" * 5000)
        raise error
    return write


@pytest.mark.parametrize("kind, reason", [("torch", "torch.save could not write the whole file"),
                                          ("safetensors", "No space left on device"),
                                          ("os", "No space left on device")])
def test_a_failed_write_is_one_line_and_leaves_the_old_file(tmp_path, kind, reason):
    target = tmp_path / "state.pt"
    target.write_bytes(b"the previous state")
    with pytest.raises(writes.WriteError) as e:
        writes.write_atomically(target, half_then(no_room(kind)))
    line = str(e.value)
    assert line.startswith(f"could not write state.pt in {tmp_path} (") and reason in line and "free there" in line
    assert "it stopped after" in line  # how far the write got: more than that much room is needed
    assert "\n" not in line and target.read_bytes() == b"the previous state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no state.pt.tmp keeping the disk full
    for other in (KeyboardInterrupt(), ValueError("a bug")):  # not a write failure: raised as it is, tmp removed
        with pytest.raises(type(other)):
            writes.write_atomically(target, half_then(other))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_a_full_disk_while_training_is_one_line_and_resumable(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert cli(argv_for(files, out)) == 0  # one epoch, finished
    state = (out / "state.pt").read_bytes()
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: half_then(no_room("torch"))(f))
    last = fails(capsys, argv_for(files, out, "vit", "--epochs", "2", "--resume"), "could not write state.pt in",
                 str(out), "free there", "--resume")
    assert last.startswith("error: ") and (out / "state.pt").read_bytes() == state
    assert not list(out.glob("*.tmp")) and (out / "results-1ep.json").is_file()  # the 1-epoch figures kept aside
    monkeypatch.undo()
    assert cli(argv_for(files, out, "vit", "--epochs", "2", "--resume")) == 0  # room again: it goes on
    assert json.loads((out / "results.json").read_text())["epochs"] == 2
