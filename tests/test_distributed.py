"""torchrun spreads (class, seed) jobs over processes: the run folders and the table equal one process's, a failed
job is reported without taking the others down, and --resume does only what is missing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from checkpoint import read_tensors
from helpers import image_folder, vit_teacher_file

ROOT = Path(__file__).resolve().parents[1]


def launch(argv, processes):
    """train.py in `processes` gloo processes through torchrun, one thread each (as in_process runs it)."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(runner + [str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def in_process(argv, capsys) -> SimpleNamespace:
    """train.py in this process (no second start of torch), on one thread, so the arithmetic (and so every figure)
    is that of each torchrun process; returns what launch returns: returncode, stdout, stderr."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = train.main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    data = Path(image_folder(d / "data", n_train=20, n_test=8))
    for f in sorted((data / "train" / "cow").iterdir())[6:]:  # cow keeps 6 (5 after validation): few for --knn-k 6
        f.unlink()
    return d, data, vit_teacher_file(d / "vit.safetensors")


def argv_for(data, teacher, out, *extra):
    return ["--backbone", "vit", "--cls", "all", "--seed", "0", "1", "--teacher", teacher, "--data-dir", str(data),
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
            "--knn-k", "6", "--out", str(out), *extra]


def runs(out: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(out)) for p in out.glob("**/config.json"))


def test_two_processes_write_what_one_process_writes(setup, capsys):
    d, data, teacher = setup
    one, two = d / "one", d / "two"
    single = in_process(argv_for(data, teacher, one), capsys)
    # the same command in two processes (one torchrun start: the slow part of this test), continuing a folder where
    # seed 0's runs already finished: --resume reports those, and each process trains one of seed 1's runs and
    # fails one cow job without stopping the other
    for run in ("s0/0-ant", "s0/1-bee"):
        shutil.copytree(one / run, two / run)
    double = launch(argv_for(data, teacher, two, "--resume"), processes=2)
    for proc in (single, double):
        assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # the cow jobs fail (see setup)
        assert "failed: " in proc.stdout and "2 of 6 jobs failed" in proc.stdout
        assert "--knn-k 6 needs at least 6 training images of class 'cow'" in proc.stdout
        assert "the other jobs go on" in proc.stderr
    assert "process 2/2" in double.stdout and "process 1/2" in double.stdout
    assert double.stdout.count("already finished") == 2 and double.stdout.count("): train ") == 2
    expected = [f"s{s}/{c}" for s in (0, 1) for c in ("0-ant", "1-bee")]  # cow failed before its folder existed
    assert runs(one) == runs(two) == expected
    for run in expected:  # seed 1's trained by the two processes
        a, b = (json.loads((root / run / "results.json").read_text()) for root in (one, two))
        for key in ("test_auroc", "val_auroc", "knn_test_auroc", "val_normal_loss", "n_train"):
            assert a[key] == b[key], (run, key)
        wa, wb = read_tensors(one / run / "student.safetensors"), read_tensors(two / run / "student.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), run
    assert (one / "table.md").read_text() == (two / "table.md").read_text()
    assert "| 0 | ant |" in (two / "table.md").read_text() and "| 2 | cow |" not in (two / "table.md").read_text()

    # fix the cause, then the same command with --resume does only the two missing jobs
    argv = argv_for(data, teacher, two, "--resume")
    argv[argv.index("--knn-k") + 1] = "2"
    again = in_process(argv, capsys)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stdout.count("already finished") == 4 and again.stdout.count("): train ") == 2
    assert "| 2 | cow |" in (two / "table.md").read_text() and "failed" not in again.stdout
    shutil.rmtree(d)
