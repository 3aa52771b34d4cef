"""The run record matches what ran: tables group comparable runs, resume compares what matters, names tell runs
apart, figures are what they say (record.py, evaluate.py's tables)."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import record
import tables
import train
from data import CIFAR10_CLASSES
from helpers import image_folder, vgg16_file, vit_teacher_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return {"data": image_folder(d / "data"), "vit": vit_teacher_file(d / "vit.safetensors"),
            "vgg": vgg16_file(d / "vgg.safetensors")}


def argv_for(files, out, backbone="vit", *extra, cls="bee"):
    return ["--backbone", backbone, "--cls", cls, "--teacher", files[backbone], "--data-dir", files["data"],
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", *(["--out", str(out)] if out else []), *extra]


## --------------------------------------------------------------------------------------------------------
## Tables (items 1-4).

def fake_run(folder: Path, backbone="vgg", cls=3, name="cat", auroc=0.8, seed=0, data_dir=None, cifar10=True,
             teacher="sha-a", classes=CIFAR10_CLASSES):
    """A finished run folder with the config.json and results.json fields that tables read."""
    folder.mkdir(parents=True)
    settings = {"backbone": backbone, "cls": cls, "class_name": name, "seed": seed, "data_dir": data_dir,
                "data": data_dir or record.TORCHVISION_CIFAR10, "epochs": 1, "batch_size": 8, "lr": 1e-3,
                "lam": 0.01, "image_size": 32, "limit": None, "select": "final", "teacher_mean": None,
                "teacher_std": None}
    config = {"settings": settings, "teacher": {"sha256": teacher, "name": f"{teacher}.safetensors",
                                                "short_name": teacher},
              "data": {"cifar10": cifar10, "classes": list(classes)}}
    results = {"backbone": backbone, "cls": cls, "class_name": name, "test_auroc": auroc, "val_auroc": auroc,
               "seed": seed}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_published_column_only_for_cifar10_matched_by_name(tmp_path):
    custom = [fake_run(tmp_path / "pets" / f"{i}-{n}", cls=i, name=n, data_dir="/x/pets", cifar10=False,
                       classes=("cat", "dog")) for i, n in enumerate(("cat", "dog"))]
    (group,) = tables.tables(custom)
    assert group["published_label"] is None and all(r["published"] is None for r in group["rows"])
    assert "90.53" not in group["markdown"]  # the paper's airplane figure beside 'cat' (the reported bug)

    cifar = [fake_run(tmp_path / "c10" / f"{i}-{n}", cls=i, name=n) for i, n in ((3, "cat"), (8, "ship"))]
    (group,) = tables.tables(cifar)
    assert [r["published"] for r in group["rows"][:2]] == [77.02, 91.45]  # cat and ship in the paper's table
    assert "Salehi et al. 2021" in group["markdown"] and "shared/docs" not in group["markdown"]
    # 1 epoch at 32 px with another teacher is not the paper's setup: the table says so beside the figures
    assert "another setup than this table's: epochs 1 (published: 200), image size 32 (published: 224)" \
        in group["markdown"]
    assert "teacher sha-a (published: vgg16)" in group["markdown"]


def test_the_published_setup_gets_no_difference_note(tmp_path):
    run = fake_run(tmp_path / "r", cls=3, name="cat")
    config = json.loads((run / "config.json").read_text())
    config["settings"] |= {"epochs": 200, "image_size": 224, "batch_size": 64, "lr": 1e-3}
    config["teacher"]["preset"] = "vgg16"
    (run / "config.json").write_text(json.dumps(config))
    (group,) = tables.tables([run])
    assert group["rows"][0]["published"] == 77.02 and group["unlike_published"] == []
    assert "another setup" not in group["markdown"]


def test_runs_in_another_precision_are_not_averaged_as_seeds(tmp_path):
    runs = [fake_run(tmp_path / f"s{seed}", seed=seed, auroc=auroc) for seed, auroc in ((0, 0.6), (1, 0.7))]
    for run, precision in zip(runs, ("bf16", "fp32"), strict=True):
        config = json.loads((run / "config.json").read_text())
        config["settings"]["precision"] = precision
        (run / "config.json").write_text(json.dumps(config))
    groups = tables.tables(runs)
    assert len(groups) == 2 and {g["rows"][0]["runs"] for g in groups} == {1}
    assert sorted(g["title"].split(", ")[-1] for g in groups) == ["bf16", "fp32"]


def test_runs_of_different_backbones_are_not_averaged(tmp_path, capsys):
    runs = [fake_run(tmp_path / "vgg", "vgg", auroc=0.52), fake_run(tmp_path / "vit", "vit", auroc=0.55)]
    groups = tables.tables(runs)
    assert len(groups) == 2
    assert sorted(g["rows"][0]["test_auroc"] for g in groups) == pytest.approx([52.0, 55.0])
    assert all(g["rows"][0]["runs"] == 1 and g["rows"][0]["std"] is None for g in groups)
    seeds = [fake_run(tmp_path / f"s{s}", "vgg", auroc=a, seed=s) for s, a in ((0, 0.5), (1, 0.6))]
    (group,) = tables.tables(seeds)  # the same experiment with two seeds: mean and std
    assert group["rows"][0]["runs"] == 2 and group["rows"][0]["test_auroc"] == pytest.approx(55.0)
    other_teacher = fake_run(tmp_path / "t2", "vgg", teacher="sha-b")
    assert len(tables.tables(seeds + [other_teacher])) == 2


def test_table_files_go_beside_the_runs_and_are_named(tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    runs = [fake_run(tmp_path / "runs" / "all-s0" / f"{i}-{n}", cls=i, name=n) for i, n in ((3, "cat"), (5, "dog"))]
    assert evaluate.main(["--table", str(tmp_path / "runs" / "all-s0")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "runs" / "all-s0" / "table.md") in printed
    assert (tmp_path / "runs" / "all-s0" / "table.csv").is_file() and not list(work.iterdir())
    other = fake_run(tmp_path / "runs" / "all-s1" / "3-cat", cls=3, name="cat", seed=1)
    assert evaluate.main(["--table", str(runs[0]), str(other)]) == 0
    assert (tmp_path / "runs" / "table.md").is_file()  # several folders: their common parent
    assert evaluate.main(["--table", str(runs[0]), "--table-out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine.md").is_file() and not list(work.iterdir())


def not_runs(folder: Path) -> dict:
    """Folders holding a config.json that are no runs: a teacher's Hugging Face folder (as a download leaves it), a
    timm model folder, a config.json without settings, unreadable JSON. Returns {name: what the note says}."""
    kinds = {"hf-vit": ({"model_type": "vit", "num_attention_heads": 3}, "a Hugging Face model folder"),
             "timm-vit": ({"architecture": "vit_small_patch16_224", "pretrained_cfg": {}}, "a timm model folder"),
             "settingless": ({"teacher": {"sha256": "x"}}, "has no settings"),
             "broken": (None, "is unreadable")}
    for name, (config, _) in kinds.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text("{not json" if config is None else json.dumps(config))
    (folder / "hf-vit" / "model.safetensors").write_bytes(b"\0" * 16)
    return {name: said for name, (_, said) in kinds.items()}


def test_evaluate_an_all_classes_folder(files, tmp_path, capsys):
    out = tmp_path / "all"
    assert train.main(argv_for(files, out, "vgg", cls="all")) == 0
    printed = capsys.readouterr().out
    assert f"class 1/3: {out / '0-ant'} (seed 0)" in printed and f"class 3/3: {out / '2-cow'}" in printed
    said = not_runs(out / "downloads")  # other things in the folder of runs: named once each, never a traceback
    assert evaluate.main([str(out)]) == 0
    captured = capsys.readouterr()
    printed, (note,) = captured.out, [line for line in captured.err.splitlines() if line.startswith("note:")]
    for sub in ("0-ant", "1-bee", "2-cow"):
        assert f"{out / sub}:" in printed
    assert printed.count("\ntest_auroc:") == 3
    assert "left out 4 folders that are not runs" in note and all(f"{out / 'downloads' / n} (" in note for n in said)
    assert all(what in note for what in said.values())
    assert evaluate.main(["--table", str(out)]) == 0 and "left out 4 folders" in capsys.readouterr().err


def test_what_is_not_a_run_is_named_never_a_traceback(files, tmp_path, capsys):
    said = not_runs(tmp_path / "d")
    for name, what in said.items():  # given by itself: one line, exit 2
        assert evaluate.main([str(tmp_path / "d" / name)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: {tmp_path / 'd' / name} is not a run folder: ") and what in last, last
    runs = [fake_run(tmp_path / "d" / f"s{s}", seed=s) for s in (0, 1)]
    (group,) = tables.tables([tmp_path / "d"])  # the table of the two runs; the others named
    assert group["rows"][0]["runs"] == len(runs) and "left out 4 folders" in capsys.readouterr().err
    assert train.main(argv_for(files, tmp_path / "d" / "hf-vit")) == 2  # --out a teacher's folder: refused
    assert "is not a run folder: a Hugging Face model folder" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "hf-vit" / "config.json").read_text())["model_type"] == "vit"


def test_a_table_on_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path / "runs" / "r")
    real = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.name.startswith("table."):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", read_only)
    assert evaluate.main(["--table", str(run), "--table-out", str(tmp_path / "out" / "table")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"error: could not write table.md in {tmp_path / 'out'} (Read-only file system; ") and \
        "free there" in err
    assert not list((tmp_path / "out").iterdir())  # no table.md.tmp left


## --------------------------------------------------------------------------------------------------------
## Resume (items 5, 6).

def test_resume_after_the_code_changed_warns_and_keeps_every_version(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    old = {"git": "aaaa", "sources_sha256": "1111"}
    monkeypatch.setattr(record, "code_version", lambda: old)
    assert train.main(argv_for(files, out)) == 0
    capsys.readouterr()
    new = {"git": "bbbb", "sources_sha256": "2222"}
    monkeypatch.setattr(record, "code_version", lambda: new)
    assert train.main(argv_for(files, out, "vit", "--epochs", "3", "--resume")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "code changed" in warning[0] and "1111 -> 2222" in warning[0]
    code = json.loads((out / "config.json").read_text())["code"]
    assert code == [old | {"epochs": [1, 1]}, new | {"epochs": [2, 3]}]
    # the same code again: no warning, the history grows in place
    assert train.main(argv_for(files, out, "vit", "--epochs", "4", "--resume")) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["code"][-1]["epochs"] == [2, 4]


def test_resume_from_another_working_directory(files, tmp_path, monkeypatch):
    out = tmp_path / "r"
    data = Path(files["data"])
    monkeypatch.chdir(data.parent)
    assert train.main(argv_for(files, out, "vit", "--data-dir", data.name)) == 0  # a relative --data-dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # --data-root ('./data', unused with --data-dir) now resolves elsewhere
    assert train.main(argv_for(files, out, "vit", "--epochs", "2", "--resume")) == 0
    assert json.loads((out / "results.json").read_text())["epochs"] == 2


## --------------------------------------------------------------------------------------------------------
## Names (item 7) and speed (item 8).

def test_default_run_folders_tell_runs_apart(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = ["--backbone", "vit", "--cls", "bee", "--teacher", files["vit"], "--data-dir", files["data"],
             "--image-size", "32", "--epochs", "1", "--limit", "20"]
    assert train.main(quick) == 0
    assert train.main(quick[:-2]) == 0  # the same without --limit: another folder, not a refusal
    assert train.main(quick[:2] + ["--cls", "1"] + quick[4:-2] + ["--resume"]) == 0  # index 1 = bee: same run
    assert train.main(quick + ["--batch-size", "16"]) == 0  # another batch size: its own folder too
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == ["vit-vit-data-bee-s0-32px-1ep", "vit-vit-data-bee-s0-32px-limit20-1ep",
                     "vit-vit-data-bee-s0-32px-limit20-1ep-batch16"]


def test_run_folders_are_checked_before_the_teacher_and_the_data(files, tmp_path, monkeypatch, capsys):
    import jobs
    out = tmp_path / "r"
    assert train.main(argv_for(files, out)) == 0
    capsys.readouterr()

    def slow_work(*args, **kwargs):
        raise AssertionError("the teacher was loaded or images decoded before the run folder was checked")
    monkeypatch.setattr(jobs, "load_teacher", slow_work)
    monkeypatch.setattr(jobs, "data_as_recorded", slow_work)
    assert train.main(argv_for(files, out, "vit", "--batch-size", "16")) == 2
    assert "another configuration (--batch-size 8 there, 16 now)" in capsys.readouterr().err
    assert train.main(argv_for(files, out)) == 2  # the same finished run: how to extend it comes first
    last = capsys.readouterr().err.strip()
    assert f"already holds this finished run (1 epoch): to train it longer, --resume --out {out} with a larger " \
           f"--epochs" in last and "--overwrite" in last
    (tmp_path / "all" / "1-bee").mkdir(parents=True)  # one class of a --cls all folder holds another run
    (tmp_path / "all" / "1-bee" / "config.json").write_text((out / "config.json").read_text())
    assert train.main(argv_for(files, tmp_path / "all", "vit", "--lr", "1e-4", cls="all")) == 2
    assert f"{tmp_path / 'all' / '1-bee'} already holds a run of another configuration" in capsys.readouterr().err
    assert not (tmp_path / "all" / "0-ant").exists()  # no job started


def test_teacher_names_for_runs():
    name = record.teacher_name
    hub = Path("/c/hub/models--facebook--dinov2-small/snapshots/0a1b/model.safetensors")
    assert name(str(hub), hub, None) == "dinov2-small"
    assert name("https://hf.co/google/vit-base/resolve/main/model.safetensors", Path("/c/x.safetensors"), None) \
        == "vit-base"
    assert name("t/mine/model.safetensors", Path("t/mine/model.safetensors"), None) == "mine"
    assert name("t/dino.safetensors", Path("t/dino.safetensors"), None) == "dino"
    assert name("vgg16", Path("/c/vgg16-123.safetensors"), "vgg16") == "vgg16"
    assert record.default_run_dir("vit", "dino", None, "cat", 0, RECIPE, RECIPE) == Path("runs/vit-dino-cat-s0")
    quick = RECIPE | {"image_size": 32, "limit": 300, "epochs": 1}
    assert record.default_run_dir("vit", "dino", "pets", "cat", 1, quick, RECIPE) == \
        Path("runs/vit-dino-pets-cat-s1-32px-limit300-1ep")


RECIPE = {"image_size": 224, "limit": None, "epochs": 10, "batch_size": 128, "lr": 5e-5, "lam": 0.01,
          "select": "final", "precision": "auto", "plain": False, "teacher_mean": None, "teacher_std": None}


@pytest.mark.parametrize("changed, part", [
    ({"batch_size": 16}, "batch16"), ({"lr": 1e-4}, "lr0.0001"), ({"lam": 0.5}, "lam0.5"),
    ({"select": "val-auroc"}, "select-val-auroc"), ({"precision": "fp32"}, "fp32"), ({"plain": True}, "plain"),
    ({"teacher_mean": [0.485, 0.456, 0.406], "teacher_std": [0.229, 0.224, 0.225]}, "imagenet-norm"),
    ({"teacher_mean": [0.5, 0.5, 0.5], "teacher_std": [0.5, 0.5, 0.5]}, "mean0.5-std0.5"),
    ({"teacher_mean": [0.4, 0.5, 0.6]}, "mean0.4_0.5_0.6"),
])
def test_default_names_carry_each_setting_that_differs_from_the_recipe(changed, part):
    assert record.default_run_dir("vit", "dino", None, "cat", 0, RECIPE | changed, RECIPE) == \
        Path(f"runs/vit-dino-cat-s0-{part}")
    mvtec_vgg = RECIPE | {"image_size": 128, "teacher_mean": (0.0,) * 3, "teacher_std": (1.0,) * 3}
    assert record.default_run_dir("vgg", "vgg16", "mvtec", "all", 0, mvtec_vgg | {"teacher_mean": [0.0] * 3},
                                  mvtec_vgg) == Path("runs/vgg-vgg16-mvtec-all-s0")  # the recipe's own values


def test_training_speed_is_all_images_over_all_seconds(files, tmp_path):
    out = tmp_path / "r"
    assert train.main(argv_for(files, out, "vit", "--epochs", "3")) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    images, seconds = sum(r["images"] for r in log), sum(r["seconds"] for r in log)
    assert images == 3 * 27 and results["train_images"] == images
    assert results["train_images_per_s"] == pytest.approx(images / seconds)
    assert all(r["images_per_s"] == pytest.approx(r["images"] / r["seconds"]) for r in log)


def test_run_folders_are_found_at_any_depth_once_and_files_are_named(tmp_path, capsys):
    a = fake_run(tmp_path / "runs" / "vit-all-s0" / "3-cat", cls=3, name="cat")
    b = fake_run(tmp_path / "runs" / "vgg-dog-s0", "vgg", cls=5, name="dog")
    (tmp_path / "runs" / "table.md").write_text("an earlier table")
    found = record.run_folders([tmp_path / "runs", a, *sorted((tmp_path / "runs").iterdir())])
    assert sorted(found) == sorted([a, b])  # the --cls all folder two levels down, and nothing twice
    assert "left out 1 file that is no run folder" in capsys.readouterr().err
    with pytest.raises(record.RunError, match="not found"):
        record.run_folders([tmp_path / "nowhere"])


def test_the_same_seed_twice_is_counted_once_and_named(tmp_path, capsys):
    first = fake_run(tmp_path / "a", cls=3, name="cat", seed=0, auroc=0.6)
    copy = fake_run(tmp_path / "b", cls=3, name="cat", seed=0, auroc=0.6)  # e.g. a copy of the folder
    other = fake_run(tmp_path / "c", cls=3, name="cat", seed=1, auroc=0.8)
    (group,) = tables.tables([first, copy, other])  # the table is still made, each seed once
    assert group["rows"][0]["runs"] == 2 and group["rows"][0]["test_auroc"] == pytest.approx(70.0)
    assert f"note: left out {copy}: the same run as {first} (class cat, seed 0" in capsys.readouterr().err
    (group,) = tables.tables([first, first])  # the same folder twice counts once
    assert group["rows"][0]["runs"] == 1


def test_no_published_figures_beside_a_limited_run(tmp_path):
    run = fake_run(tmp_path / "r", cls=3, name="cat")
    config = json.loads((run / "config.json").read_text())
    config["settings"]["limit"] = 300  # the test set is not the protocol's
    (run / "config.json").write_text(json.dumps(config))
    (group,) = tables.tables([run])
    assert group["published_label"] is None and group["rows"][0]["published"] is None
    assert group["chart_title"].endswith(", limit 300") and ", limit 300" in group["title"]


def test_a_finished_job_among_many_is_reported_not_failed(files, tmp_path, capsys):
    out = tmp_path / "r"
    assert train.main(argv_for(files, out / "s0")) == 0
    assert train.main(argv_for(files, out, "vit", "--seed", "0", "1")) == 0  # s0 exists, finished: reported
    printed = capsys.readouterr().out
    assert "already finished 1 epoch" in printed and "failed" not in printed
    assert (out / "s1" / "results.json").is_file() and (out / "table.md").is_file()


def test_default_names_can_be_pasted_into_a_shell():
    assert record.default_run_dir("vit", "my teacher", "My Pets", "My Cat", 0, RECIPE, RECIPE) == \
        Path("runs/vit-my_teacher-My_Pets-My_Cat-s0")


## --------------------------------------------------------------------------------------------------------
## The data changed after training: what a run recorded is what is scored and what a resumed run trains on.

def grow(data: Path, n_train: int, n_test: int, cls="bee"):
    """Add images to a class folder after a run, as a user drops new pictures in."""
    import shutil
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            shutil.copy(data / split / "ant" / f"{i:03d}.png", data / split / cls / f"new{i:03d}.png")


def test_evaluate_scores_the_images_the_run_recorded(files, tmp_path, capsys):
    import shutil

    from PIL import Image
    data = Path(shutil.copytree(files["data"], tmp_path / "data"))
    out = tmp_path / "r"
    assert train.main(argv_for(files, out, "vit", "--data-dir", str(data), "--knn-k", "0")) == 0
    grow(data, n_train=6, n_test=4)  # the folder gains images after the run
    capsys.readouterr()
    _, _, d, _, _ = evaluate.load_run(out, torch.device("cpu"))
    assert (len(d.train), len(d.val), len(d.test)) == (27, 9, 30)  # the run's, not 33, 9 and 34
    note = capsys.readouterr().err
    recorded = json.loads((out / "config.json").read_text())["images"]
    assert recorded["splits"]["test"]["files"]["test/ant/000.png"] == record.file_digest(data / "test/ant/000.png")
    assert [record.under(f, data) for f in d.test_files] == list(recorded["splits"]["test"]["files"])
    assert [record.under(f, data) for f in d.val_files] == list(recorded["splits"]["val"]["files"])
    assert "test/bee 10 -> 14 files (e.g. test/bee/new000.png)" in note and "train/bee 30 -> 36 files" in note
    assert "the run's own 27 training, 9 validation and 30 test images are all there, unchanged" in note

    picture = data / "test" / "ant" / "001.png"  # replaced in place: same name, other pixels
    Image.fromarray(255 - np.asarray(Image.open(picture))).save(picture)
    (data / "train" / "cow" / recorded["splits"]["val"]["files"].popitem()[0].split("/")[-1]).unlink()
    assert evaluate.main([str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "validation: 1 of 9 gone (e.g. train/cow/" in last and "test: 1 of 30 changed (e.g. test/ant/001.png)" \
        in last and "its figures would be another data set's, not this run's" in last


def test_resume_trains_on_the_split_the_run_recorded(files, tmp_path, capsys):
    import shutil
    data = Path(shutil.copytree(files["data"], tmp_path / "data"))
    out = tmp_path / "r"
    argv = argv_for(files, out, "vit", "--data-dir", str(data), "--knn-k", "0")
    assert train.main(argv) == 0
    before = json.loads((out / "config.json").read_text())
    grow(data, n_train=10, n_test=0)  # split again now, bee's held-out images would be others
    assert train.main(argv + ["--epochs", "2", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["images"] for r in log] == [27, 27]  # the same 27 training images, never a held-out one
    assert "train/bee 30 -> 40 files" in capsys.readouterr().err
    before = before["images"]
    assert json.loads((out / "config.json").read_text())["images"]["splits"] == before["splits"]
    (data / "train" / "bee" / next(iter(before["splits"]["train"]["files"])).split("/")[-1]).unlink()
    assert train.main(argv + ["--epochs", "3", "--resume"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot resume {out}: the images this run recorded changed") and \
        "training: 1 of 27 gone (e.g. train/bee/" in last


def test_torchvision_cifar10_is_checked_by_its_pixels(tmp_path, monkeypatch):
    import torchvision

    import data as data_module
    import folders
    pixels = {"train": np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
              "test": np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)}

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data = pixels["train" if train else "test"]
            self.targets = [i % 10 for i in range(len(self.data))]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    source = folders.open_source(None, tmp_path, image_size=32)
    d = data_module.one_class_data(source, "cat")
    saved = {"settings": {"class_name": "cat"}, "images": record.image_record(source, d, None)}
    again = record.data_as_recorded(folders.open_source(None, tmp_path, image_size=32), "cat", 0, None, saved, None)
    assert torch.equal(again.test, d.test)
    pixels["test"][5, 0, 0] += 1  # one pixel of one test image
    with pytest.raises(record.ImagesChanged, match="is not the one this run used: test images differ"):
        record.data_as_recorded(folders.open_source(None, tmp_path, image_size=32), "cat", 0, None, saved, None)
