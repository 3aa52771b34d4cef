"""What the GPU paths decide, tested on the CPU: the precision each device gets, fp16 loss scaling, the numerics
flags, where the feature cache goes (with fake memory sizes), torchrun's device per process, an out-of-memory error
as one line, scoring that halves its batch, host reads per step, and bench.py --check at toy sizes."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

import bench
import cache
import cli
import devicecheck
import evaluate
import jobs
import knn
import train
from data import Preprocess
from distill import KDAD, load_teacher, make_student, taps_for
from helpers import image_folder, vgg16_file, vit_teacher_file
from record import Run, Snapshots
from vgg import VGG

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {"data": image_folder(d / "data"), "vit": vit_teacher_file(d / "vit.safetensors"),
            "vgg": vgg16_file(d / "vgg.safetensors")}


def teacher_of(files, backbone):
    """The ViT teacher file's network, or for VGG a thin VGG with VGG16's widths where KDAD taps (bench.py --check's
    toy VGG): VGG16 itself is slow under the CPU's emulated bf16/fp16."""
    if backbone == "vgg":
        return VGG(devicecheck.TOY.vgg).requires_grad_(False).eval()
    return load_teacher(files["vit"], "vit", 32)


def argv_for(files, out, backbone="vit", *extra, cls="bee"):
    return ["--backbone", backbone, "--cls", cls, "--teacher", files[backbone], "--data-dir", files["data"],
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out), *extra]


## --------------------------------------------------------------------------------------------------------
## Precision and numerics.

@pytest.mark.parametrize("kind, capability, cpu_bf16, expected", [
    ("cuda", (7, 5), False, "fp16"),   # T4
    ("cuda", (7, 0), False, "fp16"),   # V100
    ("cuda", (8, 0), False, "bf16"),   # A100
    ("cuda", (9, 0), False, "bf16"),   # H100, H200
    ("cpu", None, True, "bf16"),       # AVX-512 BF16
    ("cpu", None, False, "fp32"),      # AVX2 only
])
def test_auto_precision_per_device(kind, capability, cpu_bf16, expected):
    assert cli.choose_precision("auto", kind, capability, cpu_bf16) == expected
    assert cli.choose_precision("fp32", kind, capability, cpu_bf16) == "fp32"
    assert cli.choose_precision("fp16", kind, capability, cpu_bf16) == "fp16"


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])
def test_bf16_on_a_gpu_without_it_is_refused_naming_fp16(capability):
    with pytest.raises(cli.RunError, match=r"--precision fp16") as e:
        cli.choose_precision("bf16", "cuda", capability)
    assert "\n" not in str(e.value) and f"{capability[0]}.{capability[1]}" in str(e.value)
    assert cli.choose_precision("bf16", "cpu") == "bf16"  # a CPU runs it, emulated, when asked


def test_precision_flags_accept_fp16():
    assert cli.train_args(["--backbone", "vit", "--cls", "3", "--precision", "fp16"]).precision == "fp16"
    assert cli.evaluate_args(["runs/x", "--precision", "fp16"]).precision == "fp16"
    assert cli.autocast(CPU, "fp16")().fast_dtype == torch.float16


def test_scaler_only_for_fp16():
    assert cli.grad_scaler(CPU, "fp16").is_enabled()
    assert not cli.grad_scaler(CPU, "bf16").is_enabled() and not cli.grad_scaler(CPU, "fp32").is_enabled()
    scaler = cli.grad_scaler(CPU, "fp16")
    assert scaler.get_scale() == cli.GRAD_SCALE["init_scale"]
    assert scaler.get_growth_interval() == cli.GRAD_SCALE["growth_interval"]


def test_numerics_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        cli.set_numerics("bf16")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
        assert torch.get_float32_matmul_precision() == "high"  # Inductor asks this: it must answer
        assert not torch.are_deterministic_algorithms_enabled()
        cli.set_numerics("fp32", deterministic=True)
        assert not torch.backends.cudnn.allow_tf32  # fp32 is IEEE fp32, convolutions included
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert cli.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        cli.set_numerics("fp32")  # what a plain run sets: nothing carries over to the other tests
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


## --------------------------------------------------------------------------------------------------------
## fp16 loss scaling.

def vit_student_grads(files, mode: str, shrink: float) -> torch.Tensor:
    """The flattened gradients of a small ViT student's Linear weights after one backward pass of the KDAD loss
    times `shrink`, in fp32, in unscaled fp16 autocast, or in fp16 autocast with the run's loss scaler (unscaled
    again before they are read, as scaler.step does)."""
    teacher = load_teacher(files["vit"], "vit", 32)
    torch.manual_seed(0)
    student = make_student("vit", teacher).train()
    kdad = KDAD(teacher, student, taps_for("vit", teacher))
    prep = Preprocess(32, teacher.cfg.mean, teacher.cfg.std, CPU)
    x = prep(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
             prep.center(4))
    scaler = cli.grad_scaler(CPU, "fp16" if mode == "fp16+scaler" else "fp32")
    torch.manual_seed(1)  # the same dropout in every mode
    with cli.autocast(CPU, "fp32" if mode == "fp32" else "fp16")():
        loss = kdad.loss(x) * shrink
    scaler.scale(loss).backward()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    scaler.unscale_(opt)
    return torch.cat([m.weight.grad.flatten() for m in student.modules() if isinstance(m, torch.nn.Linear)])


def test_fp16_loss_scaling_keeps_the_gradients_unscaled_fp16_flushes(files):
    # This toy student's gradients are 2^11 times larger than the recipe's (fewer images and tokens share the
    # loss): shrinking its loss puts the median gradient reaching its Linear outputs at 2^-26, where bench.py
    # --grad-scale measured the recipe's (batch 128, 224 px; docs/speed.md)
    shrink = 2.0**-11
    fp32, plain, scaled = (vit_student_grads(files, mode, shrink) for mode in ("fp32", "fp16", "fp16+scaler"))
    lost_plain = ((plain == 0) & (fp32 != 0)).float().mean().item()
    lost_scaled = ((scaled == 0) & (fp32 != 0)).float().mean().item()
    print(f"gradients lost to fp16: unscaled {lost_plain:.1%}, with the loss scaler {lost_scaled:.2%}")
    assert lost_plain > 0.2 and lost_scaled < 0.001
    assert torch.isfinite(scaled).all()
    cos = torch.nn.functional.cosine_similarity(scaled, fp32, dim=0).item()
    assert cos > 0.999  # what the scaled fp16 step would apply is the fp32 gradient, to fp16's precision


def test_loss_scale_is_saved_and_restored(tmp_path):
    student = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(student.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [5])
    scaler = cli.grad_scaler(CPU, "fp16")
    for _ in range(3):  # a few good steps move the scaler's count towards its next growth
        scaler.scale(student(torch.ones(1, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    scaler.update(new_scale=1234.0)
    run = Run(tmp_path)
    Snapshots(run, student, opt, sched, scaler, CPU).save(1, {"step": 0, "losses": [], "seen": 0, "seconds": 0.0})
    again = cli.grad_scaler(CPU, "fp16")
    Snapshots(run, torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters()), sched, again,
              CPU).load()
    assert again.get_scale() == 1234.0 and again.state_dict() == scaler.state_dict()


def test_fp16_run_end_to_end(files, tmp_path):
    out = tmp_path / "fp16"
    assert train.main(argv_for(files, out, "vit", "--precision", "fp16", "--limit", "16", "--knn-k", "0")) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and json.loads((out / "results.json").read_text())["precision"] == "fp16"


def test_cache_holds_what_the_teacher_computes(files):
    """VGG16's pooled maps come out of bf16/fp16 autocast in bf16/fp16, the ViT's hidden states in fp32: the cache
    keeps each as it is computed (an earlier version stored the ViT's fp32 states as bf16 copies)."""
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    for backbone, precision, dtype in (("vgg", "bf16", torch.bfloat16), ("vgg", "fp16", torch.float16),
                                       ("vit", "bf16", torch.float32), ("vit", "fp16", torch.float32)):
        teacher = teacher_of(files, backbone)
        kdad = KDAD(teacher, make_student(backbone, teacher), taps_for(backbone, teacher))
        prep = Preprocess(32, teacher.cfg.mean, teacher.cfg.std, CPU)
        amp = cli.autocast(CPU, precision)
        c = cache.feature_cache(kdad, images, prep, amp, 2, CPU, 2)
        with amp():
            direct = kdad.teacher_features(prep(images, prep.center(3)), kdad.taps.train_teacher)
        assert all(t.dtype == dtype for t in c.tensors), (backbone, precision)
        assert all(torch.equal(t, d) for t, d in zip(c.tensors, direct, strict=True))  # bitwise, on the CPU


## --------------------------------------------------------------------------------------------------------
## Where the cache goes.

GiB = 2**30


def test_cgroup_limits_cap_host_memory(tmp_path, monkeypatch):
    assert cache.meminfo_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n") == 2048 * 1024
    assert cache.cgroup_room("max\n", "123") is None                                      # v2, no limit
    assert cache.cgroup_room("9223372036854771712\n", "5000") is None                     # v1, no limit
    assert cache.cgroup_room(f"{8 * GiB}\n", f"{3 * GiB}\n") == 5 * GiB
    assert cache.cgroup_room(f"{GiB}", f"{2 * GiB}") == 0
    assert cache.host_room(64 * GiB, 5 * GiB) == 5 * GiB and cache.host_room(64 * GiB, None) == 64 * GiB
    assert cache.host_room(None, None) == 0
    (tmp_path / "memory.max").write_text(f"{4 * GiB}\n")  # a container of 4 GiB on a big machine
    (tmp_path / "memory.current").write_text(f"{GiB}\n")
    monkeypatch.setattr(cache, "CGROUP", tmp_path)
    assert cache.host_memory_available() <= 3 * GiB


def test_pinned_memory_rounds_up_to_powers_of_two():
    assert [cache.pinned_bytes(n) for n in (1, 2, 3, 4, 5, 1000)] == [1, 2, 4, 4, 8, 1024]
    assert cache.pinned_bytes(GiB + 1) == 2 * GiB


@pytest.mark.parametrize("need, staging, gpu, host, where", [
    (6 * GiB, [], 16 * GiB, 64 * GiB, "device"),            # fits on the GPU
    (6 * GiB, [GiB], 10 * GiB, 64 * GiB, "host"),           # too big for half the GPU: host memory
    (6 * GiB, [GiB], 10 * GiB, 12 * GiB, None),             # neither: recompute the teacher
    (10 * GiB, [GiB + 1, GiB + 1], 0, 27 * GiB, None),      # 10 + 2 x 1 GiB fits 13.5, pinned 10 + 2 x 2 does not
    (10 * GiB, [GiB, GiB], 0, 27 * GiB, "host"),
])
def test_cache_placement_gpu_then_host_then_recompute(need, staging, gpu, host, where):
    assert cache.placement(need, staging, gpu, host, cuda=True) == where


def test_cache_placement_on_the_cpu():
    assert cache.placement(GiB, [GiB], 0, 4 * GiB, cuda=False) == "device"
    assert cache.placement(3 * GiB, [], 0, 4 * GiB, cuda=False) is None


@pytest.mark.parametrize("host, expected", [(64 * GiB, "filled in host memory"), (0, None)])
def test_cache_that_runs_out_of_gpu_memory_moves_to_the_host_or_gives_up(files, monkeypatch, capsys, host, expected):
    """The fallback as a GPU run takes it, with the GPU faked: free memory says the cache fits there, filling it
    runs out of memory; it then goes to host memory if there is room, else the teacher is recomputed."""
    teacher = teacher_of(files, "vgg")
    kdad = KDAD(teacher, make_student("vgg", teacher), taps_for("vgg", teacher))
    prep = Preprocess(32, teacher.cfg.mean, teacher.cfg.std, CPU)
    tried = []

    def fill(*args):
        tried.append(args[-2])
        if args[-2] == "device":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "filled in host memory"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (16 * GiB, 16 * GiB))
    monkeypatch.setattr(cache, "host_memory_available", lambda: host)
    monkeypatch.setattr(cache, "fill", fill)
    got = cache.feature_cache(kdad, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), prep, cli.autocast(CPU, "fp32"), 2,
                              torch.device("cuda"), 2)
    assert got == expected and tried == (["device", "host"] if host else ["device"])
    err = capsys.readouterr().err
    assert "out of GPU memory while filling it; " + ("moving it to host memory" if host else "recomputing") in err


def test_no_room_for_the_cache_recomputes_the_teacher(files, monkeypatch, capsys):
    monkeypatch.setattr(cache, "host_memory_available", lambda: 1000)
    teacher = teacher_of(files, "vgg")
    kdad = KDAD(teacher, make_student("vgg", teacher), taps_for("vgg", teacher))
    prep = Preprocess(32, teacher.cfg.mean, teacher.cfg.std, CPU)
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    assert cache.feature_cache(kdad, images, prep, cli.autocast(CPU, "fp32"), 2, CPU, 2) is None
    assert "does not fit; recomputing the teacher every step" in capsys.readouterr().out


## --------------------------------------------------------------------------------------------------------
## torchrun.

@pytest.mark.parametrize("name, local_rank, count, expected", [
    ("cuda", 0, 4, "cuda:0"), ("cuda", 3, 4, "cuda:3"),
    ("cuda", 1, 1, "cuda:0"),   # SLURM --gpus-per-task, or processes sharing a one-GPU machine
    ("cuda", 5, 1, "cuda:0"),
])
def test_torchrun_gpu_per_process(name, local_rank, count, expected):
    assert cli.torchrun_gpu(name, local_rank, count) == expected


@pytest.mark.parametrize("name", ["cuda:1", "cuda:0"])
def test_torchrun_refuses_one_gpu_for_all_and_too_many_processes(name):
    with pytest.raises(cli.RunError, match=rf"--device {name} under torchrun .*use --device cuda"):
        cli.torchrun_gpu(name, 0, 4)
    with pytest.raises(cli.RunError, match=r"--nproc-per-node 2"):
        cli.torchrun_gpu("cuda", 2, 2)


def test_dist_timeout(monkeypatch):
    assert jobs.dist_timeout().total_seconds() == 30 * 60
    monkeypatch.setenv("KDAD_DIST_TIMEOUT", "2.5")
    assert jobs.dist_timeout().total_seconds() == 150
    monkeypatch.setenv("KDAD_DIST_TIMEOUT", "soon")
    with pytest.raises(cli.RunError, match="KDAD_DIST_TIMEOUT"):
        jobs.dist_timeout()


## --------------------------------------------------------------------------------------------------------
## Out of memory.

def test_out_of_memory_while_training_is_one_line_and_keeps_the_state(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    real, count = train.train_step, {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 3:  # epoch 2, step 1 (2 steps per epoch)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", step)
    assert train.main(argv_for(files, out, "vgg", "--epochs", "2", "--limit", "16", "--knn-k", "0")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: out of GPU memory while training: lower --batch-size (now 8") and \
        "--no-cache" in last and "end of epoch 1" in last and str(out / "state.pt") in last
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1


def test_scoring_halves_its_batch_when_out_of_memory(files, monkeypatch, capsys):
    teacher = load_teacher(files["vit"], "vit", 32)
    kdad = KDAD(teacher, make_student("vit", teacher), taps_for("vit", teacher))
    prep = Preprocess(32, teacher.cfg.mean, teacher.cfg.std, CPU)
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    amp = cli.autocast(CPU, "fp32")
    with knn.recorded(kdad) as expected_features:
        expected = evaluate.score_images(kdad, images, prep, amp, 2)
    real = KDAD.score

    def score(self, x, *args, **kwargs):
        out = real(self, x, *args, **kwargs)  # the teacher's pass (and its recorded features) happens first
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return out
    monkeypatch.setattr(KDAD, "score", score)
    with knn.recorded(kdad) as features:
        scores = evaluate.score_images(kdad, images, prep, amp, 8)
    assert torch.equal(scores, expected)
    assert torch.equal(torch.cat(features), torch.cat(expected_features))  # a retried batch is recorded once
    notes = [line for line in capsys.readouterr().err.splitlines() if "out of GPU memory" in line]
    assert len(notes) == 2 and "going on with 4 images at a time" in notes[0] and "with 2" in notes[1]


## --------------------------------------------------------------------------------------------------------
## Host reads per step, and results from other machines.

@pytest.mark.parametrize("backbone", ["vit", "vgg"])
def test_no_host_reads_in_a_training_step(files, tmp_path, backbone):
    """A GPU waits for every .item(), .cpu(), .tolist(), bool(tensor) the host makes: a training step makes none
    (indices and augmentation live on the device; the loss is read only by the progress bar every 10 steps).
    Counted on the CPU the way bench.py --check counts them there (CUDA counts every sync itself)."""
    args = jobs.with_recipe(cli.train_args(argv_for(files, tmp_path, backbone)))
    args.seed = 0
    teacher = teacher_of(files, backbone)
    student, kdad, prep, amp, scaler, opt, _ = train.build(args, teacher, CPU, "fp32")
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    c = cache.feature_cache(kdad, images, prep, amp, 8, CPU, 8) if backbone == "vgg" else None
    epoch = train.epoch_batches(args, SimpleNamespace(train=images), prep, 0)
    with devicecheck.host_reads(CPU, counts := {}):
        for idx, x in epoch:
            train.train_step(kdad, opt, amp, scaler, idx, x, c)
    assert counts["n"] == 0
    with devicecheck.host_reads(CPU, counts):
        assert torch.ones(1).item() == 1.0  # the counter counts
    assert counts["n"] == 1


def test_table_covers_runs_finished_on_other_machines(files, tmp_path, capsys):
    here, there = tmp_path / "here", tmp_path / "there"
    assert train.main(argv_for(files, here)) == 0
    sent = jobs.finished_run(here) | {"run": str(there)}  # as if another machine had run it into its own folder
    sent["results"] = sent["results"] | {"cls": 0, "class_name": "ant"}
    job = jobs.Job(0, 0, there)
    jobs.print_table([jobs.Job(1, 0, here), job, jobs.Job(2, 0, tmp_path / "lost")], [sent], [], tmp_path / "t")
    captured = capsys.readouterr()
    md = (tmp_path / "t.md").read_text()
    assert "| 0 | ant |" in md and "| 1 | bee |" in md
    assert "1 of the runs in the table finished on another machine" in captured.err and str(there) in captured.err
    assert "leaves out 1 job no process reported" in captured.err and "lost" in captured.err


## --------------------------------------------------------------------------------------------------------
## What a GPU keeps exact (skipped without one; written before this project ran on a GPU: see docs/speed.md).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_deterministic_run_repeats_bitwise(files, tmp_path):
    from checkpoint import read_tensors
    for k in (1, 2):
        assert train.main(argv_for(files, tmp_path / f"r{k}", "vgg", "--device", "cuda", "--deterministic",
                                   "--epochs", "2", "--knn-k", "0")) == 0
    a, b = (read_tensors(tmp_path / f"r{k}" / "student.safetensors") for k in (1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_cache_equals_recomputing_within_rounding(files, precision):
    """Cached features come from passes at the scoring batch size, recomputed ones at the training batch size: on
    a GPU the kernels can differ, so they agree to the precision's rounding, not bitwise."""
    device = torch.device("cuda")
    cli.set_numerics(precision)
    teacher = load_teacher(files["vgg"], "vgg", 32).to(device)
    kdad = KDAD(teacher, make_student("vgg", teacher).to(device), taps_for("vgg", teacher))
    prep = Preprocess(32, teacher.cfg.mean, teacher.cfg.std, device)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8).to(device)
    amp = cli.autocast(device, precision)
    c = cache.feature_cache(kdad, images, prep, amp, 64, device, 16)
    idx = torch.arange(16, 32, device=device)
    with amp():
        direct = kdad.teacher_features(prep(images[idx], prep.center(16).to(device)), kdad.taps.train_teacher)
    tol = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-3}[precision]
    for got, want in zip(c.features(idx), direct, strict=True):
        assert got.dtype == want.dtype
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < tol
    cli.set_numerics("fp32")


## --------------------------------------------------------------------------------------------------------
## bench.py --check at toy sizes, less what other tests run: torchrun (tests/test_distributed.py) and the compiled
## wrapper (tests/test_train.py).

def test_check_at_toy_sizes(capsys):
    assert bench.main(["--check", "--device", "cpu", "--skip", "torchrun", "compile"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 6 + 1 and all("| ok |" in r for r in rows), out
    for precision in ("fp32", "bf16", "fp16"):
        assert any(re.match(rf"\| train \+ score \| vgg \| {precision} \|", r) for r in rows)
    assert "loss scale 2^" in out and "the same weights, bit for bit" in out
