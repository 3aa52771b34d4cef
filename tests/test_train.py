"""train.py and evaluate.py end to end on a generated image folder with small random-weight teachers (teachers
from the hub: test_hub.py)."""
import json

import pytest
import torch

import cli
import evaluate
import train
from cache import feature_cache
from checkpoint import read_tensors
from helpers import image_folder, vgg16_file, vit_teacher_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {"data": image_folder(d / "data"), "vit": vit_teacher_file(d / "vit.safetensors"),
            "vgg": vgg16_file(d / "vgg.safetensors")}


def run(files, out, backbone="vit", *extra, cls="bee"):
    """train.py, pinned to the CPU: the equalities below (resume bit-exact, cache == recompute bitwise, fast ==
    plain within 1e-5, evaluate.py == train.py's own scores) hold there, where kernels are deterministic and give
    the same features at any batch size. On a GPU only a --deterministic run repeats bitwise, and cached features
    (computed at another batch size) equal recomputed ones to within rounding: tests/test_devices.py's CUDA tests
    and bench.py --check hold those there."""
    argv = ["--backbone", backbone, "--cls", cls, "--teacher", files[backbone], "--data-dir", files["data"],
            "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out), *extra]
    return train.main(argv)


@pytest.mark.parametrize("backbone", ["vit", "vgg"])
def test_end_to_end_and_evaluate_reproduces(files, tmp_path, backbone, capsys):
    out = tmp_path / "run"
    assert run(files, out, backbone) == 0
    for f in ("config.json", "state.pt", "log.jsonl", "student.safetensors", "results.json"):
        assert (out / f).is_file(), f
    results = json.loads((out / "results.json").read_text())
    for k in ("val_auroc", "test_auroc", "val_normal_loss", "epochs", "seconds", "train_images_per_s"):
        assert k in results, k
    assert results["n_train"] == 27 and results["n_test"] == 30 and results["selection"] == "final"
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["backbone"] == backbone and len(config["teacher"]["sha256"]) == 64
    assert config["code"][-1]["sources_sha256"] and config["code"][-1]["epochs"] == [1, 1]
    printed = capsys.readouterr().out
    assert "epoch   1/1" in printed and "img/s" in printed and "test AUROC" in printed

    again = evaluate.evaluate_run(out, torch.device("cpu"))
    assert again["test_auroc"] == pytest.approx(results["test_auroc"], abs=1e-9)
    assert again["val_auroc"] == pytest.approx(results["val_auroc"], abs=1e-9)
    assert evaluate.main([str(out)]) == 0


def test_resume_continues_where_the_run_stopped(files, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(files, straight, "vit", "--epochs", "2") == 0
    assert run(files, stopped, "vit", "--epochs", "1") == 0
    assert run(files, stopped, "vit", "--epochs", "2", "--resume") == 0
    a, b = read_tensors(straight / "student.safetensors"), read_tensors(stopped / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the shorter run's results and student are kept, not overwritten
    assert (stopped / "results-1ep.json").is_file() and (stopped / "student-1ep.safetensors").is_file()
    log = [json.loads(line) for line in (stopped / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_select_by_validation_auroc_is_recorded(files, tmp_path):
    out = tmp_path / "sel"
    assert run(files, out, "vit", "--epochs", "2", "--select", "val-auroc") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["selection"] == "val-auroc" and results["uses_anomaly_labels"] is True
    assert 1 <= results["selected_epoch"] <= 2


def test_all_classes_end_with_a_table(files, tmp_path, capsys):
    out = tmp_path / "all"
    assert run(files, out, "vgg", cls="all") == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0-ant", "1-bee", "2-cow"]
    md = (out / "table.md").read_text()
    assert md.startswith("### vgg, teacher vgg, data data, 1 epoch,") and "| mean |" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 3 + 1  # header, 3 classes, mean
    assert (out / "table.csv").read_text().startswith("group,class,name,test_auroc")
    assert "| 2 | cow |" in capsys.readouterr().out


## --------------------------------------------------------------------------------------------------------
## The fast path computes what the plain path computes.

@pytest.fixture(scope="module")
def exact_files(tmp_path_factory, files):
    # 37 px images: --image-size 32 resizes to 37, a no-op, so PIL's uint8 rounding of a real resize (up to one
    # grey level) cannot make the two paths' inputs differ; everything else in the paths is compared as it is
    d = tmp_path_factory.mktemp("exact")
    return files | {"data": image_folder(d / "data", size=37)}


@pytest.mark.parametrize("backbone", ["vit", "vgg"])
def test_fast_and_plain_paths_give_the_same_auroc(exact_files, tmp_path, backbone):
    fast, plain = tmp_path / "fast", tmp_path / "plain"
    same = ("--epochs", "2", "--precision", "fp32", "--knn-k", "0")  # the baseline is not compared here
    assert run(exact_files, fast, backbone, *same, cls="ant") == 0
    assert run(exact_files, plain, backbone, *same, "--plain", cls="ant") == 0
    a, b = (json.loads((p / "results.json").read_text()) for p in (fast, plain))
    assert round(a["test_auroc"], 3) == round(b["test_auroc"], 3)
    assert round(a["val_auroc"], 3) == round(b["val_auroc"], 3)
    losses = [[json.loads(line)["loss"] for line in (p / "log.jsonl").read_text().splitlines()] for p in (fast, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    wa, wb = read_tensors(fast / "student.safetensors"), read_tensors(plain / "student.safetensors")
    diff = sum((wa[k] - wb[k]).pow(2).sum() for k in wa if wa[k].is_floating_point()).sqrt()
    norm = sum(wa[k].pow(2).sum() for k in wa if wa[k].is_floating_point()).sqrt()
    print(f"{backbone}: fast vs plain, student weights differ by {diff / norm:.1e} of their norm")
    assert diff / norm < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_feature_cache_equals_recomputing_the_teacher(files, tmp_path, precision):
    cached, recomputed = tmp_path / "cached", tmp_path / "recomputed"
    # 12 images in shuffled batches of 4, twice: the cache is read at shuffled indices, in every epoch
    same = ("--epochs", "2", "--precision", precision, "--limit", "12", "--batch-size", "4", "--knn-k", "0")
    assert run(files, cached, "vgg", *same) == 0
    assert run(files, recomputed, "vgg", *same, "--no-cache") == 0
    a, b = read_tensors(cached / "student.safetensors"), read_tensors(recomputed / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # stored in the dtype the teacher computes in: exact


def test_feature_cache_holds_the_teacher_features(files):
    from data import Preprocess, center
    from distill import KDAD, load_teacher, make_student, vgg_taps
    teacher = load_teacher(files["vgg"], "vgg", 32)
    kdad = KDAD(teacher, make_student("vgg", teacher), vgg_taps())
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    prep = Preprocess(32, teacher.cfg.mean, teacher.cfg.std, "cpu")
    cache = feature_cache(kdad, images, prep, cli.autocast(torch.device("cpu"), "fp32"), 2, torch.device("cpu"), 2)
    direct = kdad.teacher_features(prep(images, center(5, 32)), kdad.taps.train_teacher)
    assert [c.shape for c in cache.tensors] == [d.shape for d in direct]
    assert all(torch.allclose(c, d, rtol=1e-5, atol=1e-6) for c, d in zip(cache.tensors, direct, strict=True))


def test_compiled_run_saves_plain_keys(files, tmp_path, monkeypatch):
    # the eager backend keeps the test fast; the wrapper (and its '_orig_mod.' prefix) is the same as inductor's
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))
    out = tmp_path / "compiled"
    assert run(files, out, "vit", "--compile") == 0
    keys = read_tensors(out / "student.safetensors").keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    assert evaluate.main([str(out)]) == 0


def test_teacher_mean_and_std_are_used_and_kept(files, tmp_path, capsys):
    out = tmp_path / "r"
    assert run(files, out, "vit", "--teacher-mean", "0.5", "0.5", "0.5", "--teacher-std", "0.5", "0.5", "0.5") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("teacher: ") and printed[0].endswith(": torchvision ViT, 3 blocks, width 128, "
                                                                      "2 heads (assumed), patch 8, at 32 px")
    assert printed[1] == "  input mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5): set by --teacher-mean/--teacher-std or " \
                         "the recipe"
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"]["config"]["mean"] == [0.5] * 3 and config["teacher"]["config"]["std"] == [0.5] * 3
    results = json.loads((out / "results.json").read_text())
    assert evaluate.evaluate_run(out, torch.device("cpu"))["test_auroc"] == pytest.approx(results["test_auroc"])


def test_each_logged_lr_is_the_lr_its_epoch_trained_with(files, tmp_path, monkeypatch):
    """The ViT recipe multiplies the lr by 0.2 after its milestone epoch (here moved to 1 to keep the test short):
    log.jsonl's lr of each epoch is the lr of every step of that epoch, never the next epoch's."""
    monkeypatch.setitem(train.RECIPES["cifar10"]["vit"], "milestones", [1])
    used, real = [], train.train_step

    def step(kdad, opt, *args, **kwargs):
        used.append(opt.param_groups[0]["lr"])
        return real(kdad, opt, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", step)
    assert run(files, tmp_path / "r", "vit", "--epochs", "2", "--lr", "1e-3", "--knn-k", "0") == 0  # 2 steps each
    logged = [json.loads(line)["lr"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1e-3, 2e-4]) and used == pytest.approx([1e-3] * 2 + [2e-4] * 2)


def test_the_teacher_line_says_where_the_heads_come_from_and_runs_keep_them(files, tmp_path, capsys):
    """A Hugging Face folder says its heads (config.json); a bare file does not: the assumption is printed and
    --teacher-heads overrides it, recorded for evaluate.py. A config.json changed after training is refused."""
    from helpers import hf_model
    hf = tmp_path / "hf"
    hf_model("ViTModel", hidden_size=96, num_attention_heads=3, intermediate_size=192).save_pretrained(hf)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((hf / "model.safetensors").read_bytes())  # the same tensors, nothing beside them
    argv = ["--backbone", "vit", "--cls", "bee", "--data-dir", files["data"], "--image-size", "32", "--epochs", "1",
            "--batch-size", "16", "--knn-k", "0"]
    assert train.main(argv + ["--teacher", str(bare), "--out", str(tmp_path / "bare"), "--teacher-heads", "3"]) == 0
    teacher_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher:"))
    assert "width 96, 3 heads (--teacher-heads)" in teacher_line
    settings = json.loads((tmp_path / "bare" / "config.json").read_text())["settings"]
    assert settings["teacher_heads"] == 3
    saved = json.loads((tmp_path / "bare" / "results.json").read_text())
    again = evaluate.evaluate_run(tmp_path / "bare", torch.device("cpu"))
    assert again["test_auroc"] == pytest.approx(saved["test_auroc"], abs=1e-6)  # evaluate.py used 3 heads too

    assert train.main(argv + ["--teacher", str(hf / "model.safetensors"), "--out", str(tmp_path / "hf-run")]) == 0
    assert "width 96, 3 heads (config.json)" in capsys.readouterr().out
    (hf / "config.json").unlink()  # the folder no longer says 3 heads: another network from the same file
    assert evaluate.main([str(tmp_path / "hf-run")]) == 2
    assert "described otherwise than when it was trained (heads 3 -> 1" in capsys.readouterr().err
    assert train.main(argv + ["--teacher", str(hf / "model.safetensors"), "--out", str(tmp_path / "hf-run"),
                              "--epochs", "2", "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert cli.train_args(["--backbone", "vit", "--cls", "1", "--teacher-heads", "3"]).teacher_heads == 3
