"""Every bad teacher file is refused with one message naming the file and what is wrong with it."""
import os
import random
from pathlib import Path

import pytest
import torch
import torchvision

import checkpoint
from checkpoint import CheckpointError
from helpers import hf_model, randomize, save, torchvision_vit, tv_to_timm
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
    data = Path(vit_file).read_bytes()
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


def test_transformers5_file_missing_a_tensor_names_its_own_key(tmp_path):
    """A transformers 5 ViTModel.state_dict() is read (tests/test_vit.py); a damaged one names the file's key."""
    sd = hf_model("ViTModel").state_dict()
    del sd["layers.1.mlp.fc2.bias"]
    refused(load_vit, save(sd, tmp_path / "v5.safetensors"), "ViTModel", "transformers 5 names", "misses tensor",
            "layers.1.mlp.fc2.bias")


@pytest.mark.parametrize("source", ["hf-dinov2-giant-v4", "hf-dinov2-giant-v5", "timm-giant"])
def test_swiglu_dinov2_is_refused_naming_what_it_is(tmp_path, source):
    if source.startswith("hf"):
        sd = hf_model("Dinov2Model", use_swiglu_ffn=True).state_dict()  # transformers 5: mlp.gate_proj / up / down
        if source.endswith("v4"):  # the hub's dinov2-giant: mlp.weights_in (gate and up stacked), weights_out
            for i in range(2):
                a = f"encoder.layer.{i}.mlp."
                for t in ("weight", "bias"):
                    sd[f"{a}weights_in.{t}"] = torch.cat([sd.pop(f"{a}gate_proj.{t}"), sd.pop(f"{a}up_proj.{t}")])
                    sd[f"{a}weights_out.{t}"] = sd.pop(f"{a}down_proj.{t}")
    else:
        timm_vit = pytest.importorskip("timm.models.vision_transformer")
        from timm.layers import SwiGLUPacked
        sd = randomize(timm_vit.VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1,
                                                  mlp_layer=SwiGLUPacked, num_classes=0)).state_dict()
    refused(load_vit, save(sd, tmp_path / "g.safetensors"), "gated (SwiGLU) MLP", "ViT-g/14")


def test_onnx_file_passed_as_teacher(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(200))
    refused(load_vit, path, "ONNX model", "python checkpoint.py convert")


def convert(*args) -> int:
    return checkpoint.main(["convert", *map(str, args)])


def test_convert_whole_model_pickle_says_what_it_is(tmp_path, capsys):
    torch.save(torchvision_vit(), tmp_path / "whole.pth")
    assert convert(tmp_path / "whole.pth", tmp_path / "w.safetensors") == 2
    err = capsys.readouterr().err
    assert "torchvision.models.vision_transformer.VisionTransformer" in err and "state_dict()" in err, err
    assert "download it again" not in err and err.count("\n") == 1
    assert not (tmp_path / "w.safetensors").exists()


def test_convert_dataparallel_pickle(tmp_path):
    sd = torchvision_vit().state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "dp.pth")
    assert convert(tmp_path / "dp.pth", tmp_path / "dp.safetensors") == 0
    assert not any(k.startswith("module.") for k in checkpoint.read_header(tmp_path / "dp.safetensors"))
    assert torch.equal(load_vit(tmp_path / "dp.safetensors").cls_token, sd["class_token"])


def test_convert_missing_input_and_existing_output(tmp_path, capsys):
    assert convert(tmp_path / "nope.pth", tmp_path / "out.safetensors") == 2
    assert "not found" in capsys.readouterr().err
    torch.save(torchvision_vit().state_dict(), tmp_path / "m.pth")
    (tmp_path / "out.safetensors").write_bytes(b"precious")
    assert convert(tmp_path / "m.pth", tmp_path / "out.safetensors") == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    torch.save(torchvision_vit().state_dict(), tmp_path / "m.pth")
    assert convert(tmp_path / "m.pth", tmp_path / "m.safetensors") == 0
    checkpoint.save_tensors({"w": torch.zeros(2)}, tmp_path / "s.safetensors")
    for name in ("m.safetensors", "s.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_convert_onnx_refusals(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all" * 10)
    assert convert(tmp_path / "junk.onnx", tmp_path / "j.safetensors") == 2
    assert "could not be read as an ONNX model" in capsys.readouterr().err
    h = onnx.helper  # a graph with no ViT in it
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(h.make_model(graph), str(tmp_path / "relu.onnx"))
    assert convert(tmp_path / "relu.onnx", tmp_path / "r.safetensors") == 2
    assert "no Hugging Face ViT / DINOv2 backbone" in capsys.readouterr().err


@pytest.mark.parametrize("library", ["timm", "transformers", "transformers-head"])
def test_distilled_deit_is_refused_naming_what_it_is(tmp_path, library):
    if library == "timm":
        timm_vit = pytest.importorskip("timm.models.deit")
        sd = timm_vit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1,
                                                 num_classes=0).state_dict()
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.DeiTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                         intermediate_size=128, image_size=32, patch_size=8)
        head = library.endswith("head")  # "deit." + cls_classifier / distillation_classifier
        sd = (transformers.DeiTForImageClassificationWithTeacher if head else transformers.DeiTModel)(config)
        sd = sd.state_dict()
    refused(load_vit, save(sd, tmp_path / "deit.safetensors"), "distilled DeiT", "distillation token")


def test_a_pickled_whole_model_passed_as_teacher_says_what_to_do(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(torchvision_vit(), path)  # the model object, not its state_dict()
    message = refused(load_vit, path, "is a pickled", "(a whole model)", "model.state_dict()")
    assert "whole-converted.safetensors" not in message or str(tmp_path) not in message.split("convert weights.pth")[1]
