"""The command lines answer --help and bad flags before importing torch; progress output suits where it goes."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(*argv, env=None) -> tuple[set, subprocess.CompletedProcess]:
    """Run a script with -X importtime (and `env` added to the environment) and return the top-level modules it
    imported (and the process)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=os.environ | (env or {}))
    modules = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return modules, proc


@pytest.mark.parametrize("argv", [["train.py", "--help"], ["evaluate.py", "--help"], ["bench.py", "--help"],
                                  ["train.py", "--backbone", "vit", "--cls", "3", "--seed", "1", "1"],
                                  ["train.py", "--backbone", "resnet", "--cls", "3"],
                                  ["train.py", "--backbone", "vit", "--cls", "3", "--epochs", "0"],
                                  ["evaluate.py", "runs/x", "--batch-size", "0"]])
def test_help_and_flag_errors_come_before_torch(argv):
    modules, proc = imported_modules(*argv)
    assert "torch" not in modules and "torchvision" not in modules and "sklearn" not in modules, sorted(modules)
    if "--help" in argv:
        assert proc.returncode == 0 and "usage:" in proc.stdout
    else:
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_plots_without_matplotlib_answer_before_torch(tmp_path):
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['evaluate.py', 'runs/x', '--plots']; "
            "runpy.run_path('evaluate.py', run_name='__main__')")
    modules, proc = imported_modules("-c", hide)
    assert "torch" not in modules and "matplotlib" not in modules, sorted(modules)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --plots needs matplotlib, which is not installed: " \
                                                   "pip install matplotlib"


def test_offline_mode_without_the_teacher_answers_before_torch(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for teacher in ([], ["--teacher", "dino-vitb16"], ["--teacher", "https://huggingface.co/timm/vit_base_patch16_"
                                                                    "224.dino/resolve/main/model.safetensors"]):
        modules, proc = imported_modules("train.py", "--backbone", "vit", "--cls", "3", *teacher, env=env)
        assert "torch" not in modules, sorted(modules)
        assert proc.returncode == 2 and "offline mode is on (HF_HUB_OFFLINE=1), and it is not in the Hugging Face " \
            "cache" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "hf").exists()


def test_progress_writes_lines_when_not_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with cli.progress(range(5), total=5, desc="epoch 1/1", interval=0) as bar:
        for _ in bar:
            pass
    lines = err.getvalue().splitlines()
    assert lines and "\r" not in err.getvalue() and all(line.startswith("epoch 1/1") for line in lines)
    assert "5/5" in lines[-1]
    same, line = io.StringIO(), "epoch 1/1: 3/3 [00:30<00:00, 10.25s/batch]"
    out = cli._Lines(same)
    for _ in range(2):  # the last update, then the bar closing, drawn alike: one line
        out.write("\r" + line)
    assert same.getvalue() == line + "\n"
    err.truncate(0)
    err.seek(0)
    with cli.progress(range(5), total=5, desc="quick", interval=3600) as bar:  # ends before the first interval
        list(bar)
    assert err.getvalue() == ""
