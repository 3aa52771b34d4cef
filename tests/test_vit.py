"""The hand-written ViT reproduces the reference libraries on the same weights, in every checkpoint layout."""
import pytest
import torch

import vit
from helpers import (relative_diff, save, torchvision_hidden_states, torchvision_vit, tv_to_hf, tv_to_timm,
                     randomize)

TOL = 1e-5


def check_hidden(model, reference_hidden, x, label):
    with torch.no_grad():
        ours = model(x)
    assert len(ours) == len(reference_hidden)
    worst = max(relative_diff(a, b) for a, b in zip(ours, reference_hidden, strict=True))
    print(f"{label}: max relative difference over {len(ours)} hidden states = {worst:.2e}")
    assert worst < TOL, f"{label}: {worst:.2e}"


@pytest.mark.parametrize("layout", ["torchvision", "timm", "hf-ViTModel", "hf-ViTForImageClassification"])
def test_layouts_match_torchvision(tmp_path, layout):
    eps = 1e-12 if layout.startswith("hf") else 1e-6  # each family's own LayerNorm epsilon
    ref = torchvision_vit(eps=eps)
    sd = ref.state_dict()
    tensors = {"torchvision": lambda: sd, "timm": lambda: tv_to_timm(sd),
               "hf-ViTModel": lambda: tv_to_hf(sd, head_model=False),
               "hf-ViTForImageClassification": lambda: tv_to_hf(sd, head_model=True)}[layout]()
    model = vit.load_vit(save(tensors, tmp_path / "t.safetensors"))
    assert model.layout == layout.split("-")[0].replace("hf", "huggingface")
    assert model.cfg.eps == eps and (model.cfg.depth, model.cfg.width, model.cfg.heads) == (3, 128, 2)
    assert model.cfg.mean == ((0.5,) * 3 if layout.startswith("hf") else vit.IMAGENET_MEAN)
    x = torch.randn(2, 3, 32, 32)
    check_hidden(model, torchvision_hidden_states(ref, x), x, layout)


def test_layer_scale_and_registers_match_timm(tmp_path):
    """DINOv2 "reg4" layout: LayerScale, 4 register tokens, position embedding over the patches only."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    ref = timm_vit.VisionTransformer(img_size=28, patch_size=7, embed_dim=128, depth=3, num_heads=2, mlp_ratio=2,
                                     init_values=1e-5, reg_tokens=4, no_embed_class=True, num_classes=0)
    randomize(ref)
    model = vit.load_vit(save(ref.state_dict(), tmp_path / "dinov2.safetensors"))
    cfg = model.cfg
    assert (cfg.registers, cfg.layer_scale, cfg.pos_embed_prefix, cfg.image_size) == (4, True, False, 28)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        h = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        hidden = [h]
        for block in ref.blocks:
            hidden.append(block(hidden[-1]))
    check_hidden(model, hidden, x, "timm LayerScale + registers")


def test_dino_layout_matches_timm(tmp_path):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    ref = randomize(timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2,
                                               num_classes=0))
    model = vit.load_vit(save(ref.state_dict(), tmp_path / "dino.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = [ref._pos_embed(ref.patch_embed(x))]
        for block in ref.blocks:
            hidden.append(block(hidden[-1]))
    check_hidden(model, hidden, x, "timm DINO")


def test_sdpa_equals_written_out_attention():
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(image_size=32, patch_size=8, width=128, depth=2, heads=4, mlp_width=256)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        vit.set_fused_attn(model, False)
        manual = model(x)
    worst = max(relative_diff(a, b) for a, b in zip(fused, manual, strict=True))
    print(f"SDPA vs written-out attention: {worst:.2e}")
    assert worst < TOL


def test_pos_embed_resampling(tmp_path):
    path = save(torchvision_vit().state_dict(), tmp_path / "t.safetensors")
    base = vit.load_vit(path)
    same = vit.load_vit(path, image_size=32)
    assert torch.equal(same.pos_embed, base.pos_embed)
    bigger = vit.load_vit(path, image_size=48)  # grid 4x4 -> 6x6
    assert bigger.pos_embed.shape == (1, 1 + 36, 128) and bigger.cfg.image_size == 48
    assert torch.equal(bigger.pos_embed[:, :1], base.pos_embed[:, :1])  # the CLS slot is kept as it is
    assert [h.shape for h in bigger(torch.randn(1, 3, 48, 48))] == [(1, 37, 128)] * 4
    timm_pe = pytest.importorskip("timm.layers.pos_embed")
    expected = timm_pe.resample_abs_pos_embed(base.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert relative_diff(bigger.pos_embed.detach(), expected) < TOL


def test_image_size_must_fit_patches(tmp_path):
    path = save(torchvision_vit().state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(vit.CheckpointError, match="not a multiple of the teacher's patch size 8"):
        vit.load_vit(path, image_size=36)


@pytest.mark.parametrize("registers", [0, 4])
def test_student_lines_up_with_teacher_and_learns_everywhere(registers):
    teacher = vit.ViT(vit.ViTConfig(image_size=32, patch_size=8, width=64, depth=6, heads=1, mlp_width=128,
                                    registers=registers, pos_embed_prefix=False)).eval()
    cfg = vit.student_config(teacher.cfg)
    assert (cfg.depth, cfg.heads, cfg.mlp_width, cfg.dropout) == (4, 8, 512, 0.2)
    student = vit.ViT(cfg)
    x = torch.randn(2, 3, 32, 32)
    t_shapes = {h.shape for h in teacher(x)}
    hidden = student(x)
    assert len(hidden) == 5 and {h.shape for h in hidden} == t_shapes == {(2, 1 + registers + 16, 64)}
    sum(h.pow(2).mean() for h in hidden).backward()
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name


def test_student_needs_width_divisible_by_heads():
    with pytest.raises(vit.CheckpointError, match="cannot be split into 8 student heads"):
        vit.student_config(vit.ViTConfig(width=100, heads=1))


def test_vit_huge_width_has_sixteen_heads(tmp_path):
    """ViT-H (width 1280) breaks the 64-dims-per-head rule: 16 heads of 80."""
    ref = torchvision_vit(patch_size=16, num_layers=1, num_heads=16, hidden_dim=1280, mlp_dim=64)
    model = vit.load_vit(save(ref.state_dict(), tmp_path / "h.safetensors"))
    assert model.cfg.heads == 16
    x = torch.randn(1, 3, 32, 32)
    check_hidden(model, torchvision_hidden_states(ref, x), x, "ViT-H width")


def test_nan_in_an_unused_head_is_fine(tmp_path):
    sd = tv_to_hf(torchvision_vit(eps=1e-12).state_dict(), head_model=True)
    sd["classifier.weight"][:] = float("nan")  # e.g. torchvision's IMAGENET1K_FEATURES VGG has a NaN classifier
    assert vit.load_vit(save(sd, tmp_path / "t.safetensors")).cfg.depth == 3
