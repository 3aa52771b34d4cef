"""Every bad teacher file is refused with one message naming the file and what is wrong with it."""
import random

import pytest
import torch
import torchvision

import checkpoint
from checkpoint import CheckpointError
from helpers import save, torchvision_vit, tv_to_timm
from vgg import load_vgg16
from vit import load_vit


@pytest.fixture
def vit_file(tmp_path):
    return save(tv_to_timm(torchvision_vit().state_dict()), tmp_path / "teacher.safetensors")


def refused(loader, path, *fragments):
    with pytest.raises(CheckpointError) as e:
        loader(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    for f in fragments:
        assert f in message, message
    return message


def test_missing_file(tmp_path):
    refused(load_vit, tmp_path / "nope.safetensors", "not found")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(1).randbytes(4096))
    refused(load_vit, path, "not a safetensors file")


def test_pytorch_pickle(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(3)}, path)
    refused(load_vit, path, "PyTorch pickle", "python checkpoint.py convert")


def test_html_error_page(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>" * 20)
    refused(load_vit, path, "HTML", "failed download")


def test_truncated_mid_tensor(tmp_path, vit_file):
    data = open(vit_file, "rb").read()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    refused(load_vit, path, "truncated", "download it again")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    refused(load_vit, path, "empty or truncated")


def test_layout_we_do_not_read(tmp_path):
    path = save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.safetensors")
    refused(load_vit, path, "not a ViT checkpoint", "bn1.bias")
    refused(load_vgg16, path, "not a VGG16 checkpoint")


def test_wrong_family(tmp_path, vit_file):
    refused(load_vgg16, vit_file, "not a VGG16 checkpoint")


def test_missing_keys(tmp_path, vit_file):
    sd = checkpoint.read_tensors(vit_file)
    del sd["blocks.1.mlp.fc2.bias"], sd["norm.weight"]
    refused(load_vit, save(sd, tmp_path / "m.safetensors"), "misses 2 tensors", "blocks.1.mlp.fc2.bias")


def test_missing_key_in_renamed_layout(tmp_path):
    sd = torchvision_vit().state_dict()
    del sd["encoder.layers.encoder_layer_1.ln_2.weight"]
    refused(load_vit, save(sd, tmp_path / "m.safetensors"), "misses tensor", "encoder_layer_1.ln_2.weight")


def test_unexpected_keys(tmp_path, vit_file):
    sd = checkpoint.read_tensors(vit_file) | {"blocks.0.attn.rel_pos": torch.zeros(3)}
    refused(load_vit, save(sd, tmp_path / "u.safetensors"), "unexpected", "blocks.0.attn.rel_pos")


def test_wrong_shape(tmp_path, vit_file):
    sd = checkpoint.read_tensors(vit_file)
    sd["blocks.2.attn.proj.weight"] = torch.zeros(128, 64)
    refused(load_vit, save(sd, tmp_path / "s.safetensors"), "wrong shape", "blocks.2.attn.proj.weight")


def test_vgg_missing_and_wrong_shape(tmp_path):
    sd = {f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}
    sd["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    refused(load_vgg16, save(sd, tmp_path / "v.safetensors"), "wrong shape", "features.28.weight")
    del sd["features.28.weight"]
    refused(load_vgg16, save(sd, tmp_path / "v.safetensors"), "misses 1 tensors", "features.28.weight")


def test_non_finite_weights(tmp_path, vit_file):
    sd = checkpoint.read_tensors(vit_file)
    sd["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    refused(load_vit, save(sd, tmp_path / "nan.safetensors"), "non-finite", "blocks.0.mlp.fc1.weight")


def test_convert_pickle_round_trip(tmp_path):
    sd = torchvision_vit().state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.pth")
    assert checkpoint.main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "m.safetensors")]) == 0
    model = load_vit(tmp_path / "m.safetensors")
    assert torch.equal(model.cls_token, sd["class_token"])
