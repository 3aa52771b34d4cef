"""Teachers from the Hugging Face hub through huggingface_hub, tested without network: a stand-in hub on
127.0.0.1 (helpers.FakeHub), a cache the tests fill, offline mode, and an endpoint on a closed port."""
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.utils._http
import pytest
import torch

import checkpoint
from hub import hub_download
import train
from helpers import FakeHub, image_folder, torchvision_vit, tv_to_hf, vit_teacher_file

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_REPO = "nateraw/vit-base-patch16-224-cifar10"  # the ViT default: a pickle on the hub
DINO_REPO = "timm/vit_small_patch16_224.dino"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    bin_path = d / "pytorch_model.bin"  # the reproduction's teacher, small, in HF layout, as a pickle
    torch.save(tv_to_hf(torchvision_vit(eps=1e-12).state_dict(), head_model=True), bin_path)
    return {"data": image_folder(d / "data"), "vit": vit_teacher_file(d / "vit.safetensors"), "bin": bin_path}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda s: None)  # no back-off between retries
    yield hub
    hub.close()


def argv_for(files, out, cache, *extra):
    """A short run (these tests are about where the teacher comes from, not what the run computes)."""
    return ["--backbone", "vit", "--cls", "1", "--data-dir", files["data"], "--image-size", "32", "--epochs", "1",
            "--limit", "12", "--knn-k", "0", "--cache-dir", str(cache), "--out", str(out), *extra]


def test_preset_is_fetched_once_converted_once_and_recorded(files, tmp_path, hub, capsys):
    hub.put(CIFAR10_REPO, "pytorch_model.bin", files["bin"].read_bytes())
    cache = tmp_path / "cache"
    assert train.main(argv_for(files, tmp_path / "r", cache)) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned on CIFAR-10 labels" in printed
    assert all(len(line) <= 120 for line in printed.splitlines() if line.startswith(("teacher:", "  ")))
    snapshot = cache / f"models--{CIFAR10_REPO.replace('/', '--')}" / "snapshots" / FakeHub.COMMIT
    assert (snapshot / "pytorch_model.bin").is_file()  # the standard Hugging Face cache layout
    (converted,) = cache.glob("nateraw--*-pytorch_model.bin.safetensors")
    teacher = json.loads((tmp_path / "r" / "config.json").read_text())["teacher"]
    assert teacher["config"]["mean"] == teacher["config"]["std"] == [0.5] * 3  # its own normalisation
    assert teacher["origin"] == {"repo": CIFAR10_REPO, "filename": "pytorch_model.bin", "revision": "main",
                                 "commit": FakeHub.COMMIT}
    assert teacher["preset"] == "vit-b16-cifar10" and teacher["path"] == str(converted)

    assert train.main(argv_for(files, tmp_path / "r2", cache)) == 0
    assert hub.gets == 1 and "converting" not in capsys.readouterr().out  # neither fetched nor converted twice
    assert train.main(["--teacher", str(converted)] + argv_for(files, tmp_path / "r3", cache)) == 0
    assert "fine-tuned on CIFAR-10 labels" in capsys.readouterr().out  # the same teacher, given by its path
    renamed = tmp_path / "my-teacher.safetensors"  # converted by hand and renamed: its 10-class head still shows
    renamed.write_bytes(converted.read_bytes())
    assert train.main(["--teacher", str(renamed)] + argv_for(files, tmp_path / "r5", cache)) == 0
    printed = capsys.readouterr().out
    assert "carries a 10-class classifier head" in printed and f"teacher: .../{renamed.name}: " in printed
    assert all(len(line) <= 120 for line in printed.splitlines() if line.startswith(("teacher:", "  ")))

    hub.close()  # no network now: the cached file still serves
    assert train.main(argv_for(files, tmp_path / "r4", cache)) == 0


def test_no_network_is_one_line_and_leaves_nothing(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda s: None)
    cache = tmp_path / "cache"
    assert train.main(argv_for(files, tmp_path / "r", cache)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"could not download pytorch_model.bin of {CIFAR10_REPO} (revision main) from http://127.0.0.1:9: " \
           f"no connection" in err and "'Without network' in the README" in err
    assert not cache.exists() and not (tmp_path / "r").exists()  # nothing left behind
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert train.main(argv_for(files, tmp_path / "r", cache)) == 2
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in capsys.readouterr().err


def test_offline_mode_reads_the_cache(files, tmp_path, hub):
    """HF_HUB_OFFLINE=1, as users set it, in a fresh process: the file fetched earlier is used, nothing asked."""
    hub.put(DINO_REPO, "model.safetensors", Path(files["vit"]).read_bytes())
    cache = tmp_path / "cache"
    assert train.main(argv_for(files, tmp_path / "r", cache, "--teacher", "dino-vits16")) == 0
    hub.close()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv_for(files, tmp_path / "r2", cache,
                                                                              "--teacher", "dino-vits16")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-1500:]
    config = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert config["teacher"]["origin"]["commit"] == FakeHub.COMMIT


def test_broken_and_foreign_downloads_are_not_kept(files, tmp_path, hub, capsys):
    cache = tmp_path / "cache"
    argv = argv_for(files, tmp_path / "r", cache, "--teacher", "dino-vits16")
    good = Path(files["vit"]).read_bytes()
    hub.put(DINO_REPO, "model.safetensors", good)
    hub.mode = "half"  # the connection drops half-way
    assert train.main(argv) == 2
    assert "could not download model.safetensors" in capsys.readouterr().err
    assert not list(cache.glob("models--*/blobs/*")), "no part of the file is kept"
    hub.mode = "whole"
    hub.put(DINO_REPO, "model.safetensors", b"<!DOCTYPE html><html><body>rate limited</body></html>\n" * 10)
    assert train.main(argv) == 2  # a page instead of the file, twice
    assert "no safetensors file, downloaded twice" in capsys.readouterr().err
    assert not list(cache.glob("models--*/blobs/*")) and not list(cache.glob("models--*/snapshots/*/*"))
    hub.put(DINO_REPO, "model.safetensors", good)
    assert train.main(argv) == 0
    (blob,) = cache.glob("models--*/blobs/*")
    blob.write_bytes(good[:5000])  # damaged later (a disk problem, a killed copy)
    assert train.main(argv_for(files, tmp_path / "r2", cache, "--teacher", "dino-vits16")) == 0
    assert "damaged" in capsys.readouterr().out and blob.read_bytes() == good


def test_addresses_and_hub_errors(files, tmp_path, hub, capsys):
    cache = tmp_path / "cache"
    plain = hub.root / "elsewhere" / "teacher.safetensors"  # not a /resolve/ address: fetched into our cache
    plain.parent.mkdir(parents=True)
    plain.write_bytes(Path(files["vit"]).read_bytes())
    assert train.main(argv_for(files, tmp_path / "r", cache, "--teacher", f"{hub.endpoint}/elsewhere/"
                                                                           f"teacher.safetensors")) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["teacher"]["origin"] == \
        {"url": f"{hub.endpoint}/elsewhere/teacher.safetensors"}
    hub.put(DINO_REPO, "model.safetensors", plain.read_bytes())
    address = f"{hub.endpoint}/{DINO_REPO}/resolve/main/model.safetensors"  # a hub address: the hub's cache
    assert train.main(argv_for(files, tmp_path / "r2", cache, "--teacher", address)) == 0
    config = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert config["teacher"]["origin"]["repo"] == DINO_REPO and config["teacher"]["preset"] == "dino-vits16"
    assert train.main(argv_for(files, tmp_path / "r3", cache, "--teacher", "dinov2-vits14")) == 2  # not on this hub
    assert "no repository timm/vit_small_patch14_dinov2.lvd142m" in capsys.readouterr().err
    hub.put(DINO_REPO, "other.safetensors", b"")
    assert train.main(argv_for(files, tmp_path / "r4", cache, "--teacher",
                               f"{hub.endpoint}/{DINO_REPO}/resolve/main/missing.safetensors")) == 2
    assert f"{DINO_REPO} has no file missing.safetensors at revision main" in capsys.readouterr().err


def test_a_cache_without_refs_main_is_still_a_cache(files, tmp_path, monkeypatch, capsys):
    """A cache copied by hand without refs/ (or whose refs/main names a snapshot that is gone): offline,
    huggingface_hub finds nothing through refs/main, but the snapshot file is there."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    repo_dir = cache / f"models--{DINO_REPO.replace('/', '--')}"
    snap = repo_dir / "snapshots" / FakeHub.COMMIT / "model.safetensors"
    snap.parent.mkdir(parents=True)
    snap.write_bytes(Path(files["vit"]).read_bytes())
    assert hub_download(DINO_REPO, "model.safetensors", "main", cache) == snap
    err = capsys.readouterr().err
    assert "has no refs/main" in err and f"only snapshot that holds model.safetensors, {FakeHub.COMMIT}" in err
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("f" * 40)  # names a snapshot that is not there
    assert hub_download(DINO_REPO, "model.safetensors", "main", cache) == snap
    other = repo_dir / "snapshots" / ("e" * 40) / "model.safetensors"
    other.parent.mkdir()
    other.write_bytes(snap.read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match=r"holds model.safetensors in 2 snapshots of .* "
                       r"\(0123456789ab, eeeeeeeeeeee\) but no refs/main says which is main: pass one with --teacher"):
        hub_download(DINO_REPO, "model.safetensors", "main", cache)


def test_a_model_folder_as_teacher_is_its_weights_file(tmp_path):
    import hub
    folder = tmp_path / "saved"
    folder.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="is a folder holding no checkpoint file: pass the checkpoint"):
        hub.resolve_teacher(str(folder))
    (folder / "pytorch_model.bin").write_bytes(b"x")
    (folder / "model-fp16.safetensors").write_bytes(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="holding model-fp16.safetensors, pytorch_model.bin"):
        hub.resolve_teacher(str(folder))
    (folder / "model.safetensors").write_bytes(b"x")  # what save_pretrained writes, config.json beside it
    assert hub.resolve_teacher(str(folder)).path == folder / "model.safetensors"
