"""The hand-written VGG16 reproduces torchvision's pool outputs; the cloner has the paper's shape."""
import pytest
import torch
import torchvision

import vgg
from helpers import relative_diff, save


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return torchvision.models.vgg16().eval()


def timm_layout(sd: dict) -> dict:
    """torchvision VGG16 -> timm vgg16.tv_in1k keys: same features, head renamed (checkpoints.md section 5)."""
    out = {k: v for k, v in sd.items() if k.startswith("features.")}
    out["pre_logits.fc1.weight"] = sd["classifier.0.weight"].reshape(4096, 512, 7, 7)
    out["pre_logits.fc1.bias"] = sd["classifier.0.bias"]
    out["pre_logits.fc2.weight"] = sd["classifier.3.weight"].reshape(4096, 4096, 1, 1)
    out["pre_logits.fc2.bias"] = sd["classifier.3.bias"]
    out["head.fc.weight"], out["head.fc.bias"] = sd["classifier.6.weight"], sd["classifier.6.bias"]
    return out


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_vgg16_matches_torchvision_pools(tmp_path, reference, layout):
    sd = reference.state_dict()
    model = vgg.load_vgg16(save(sd if layout == "torchvision" else timm_layout(sd), tmp_path / "v.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        pools, h = [], x
        for layer in reference.features:
            h = layer(h)
            if isinstance(layer, torch.nn.MaxPool2d):
                pools.append(h)
    assert len(ours) == len(pools) == 5
    worst = max(relative_diff(a, b) for a, b in zip(ours, pools, strict=True))
    print(f"VGG16 {layout}: max relative difference over the 5 pool outputs = {worst:.2e}")
    assert worst < 1e-5
    assert [p.shape[1] for p in ours] == [64, 128, 256, 512, 512]


def test_cloner_shape_and_gradients():
    student = vgg.VGG(vgg.CLONER)
    assert student.stage_channels == [16, 128, 256, 512, 512]
    convs = [m for m in student.features if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    # BatchNorm after every conv except the one feeding a pool
    layers = list(student.features)
    for i, m in enumerate(layers):
        if isinstance(m, torch.nn.Conv2d):
            feeds_pool = isinstance(layers[i + 2], torch.nn.MaxPool2d)
            assert isinstance(layers[i + 1], torch.nn.BatchNorm2d) != feeds_pool
    stages = student(torch.randn(2, 3, 64, 64))
    assert [s.shape[1:] for s in stages] == [(16, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    sum(s.pow(2).mean() for s in stages).backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"no gradient for {name}"
