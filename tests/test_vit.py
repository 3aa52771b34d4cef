"""The hand-written ViT reproduces the reference libraries on the same weights, in every checkpoint layout."""
import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import vit
from helpers import (TINY_VIT, hf_from_files, hf_hidden_states, hf_model, hf_names_4, randomize, relative_diff, save,
                     torchvision_hidden_states, torchvision_vit, tv_to_hf, tv_to_timm)

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
    tv_vit = pytest.importorskip("torchvision.models.vision_transformer")  # a torchvision file: torchvision's resize
    expected = tv_vit.interpolate_embeddings(48, 8, {"encoder.pos_embedding": base.pos_embed.detach()})
    assert relative_diff(bigger.pos_embed.detach(), expected["encoder.pos_embedding"]) < TOL


## Each family at a larger and a smaller size than its file's, against its own library's forward: transformers'
## interpolate_pos_encoding, torchvision's interpolate_embeddings, timm's checkpoint_filter_fn.
SIZES = (32, 48, 24)  # the files are 32 px with 8 px patches: grid 4, 6 and 3
HF_ARCHS = ["ViTModel", "ViTForImageClassification", "Dinov2Model", "Dinov2ForImageClassification",
            "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"]


@pytest.mark.parametrize("names", ["transformers4", "transformers5"])
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_huggingface_models_match_transformers(tmp_path, arch, names):
    """Hub files (transformers 4 names) and transformers 5 state_dicts, read as transformers reads them."""
    ref = hf_model(arch)
    sd = ref.state_dict()
    if names == "transformers4":
        sd = hf_names_4(sd)
        assert not any("q_proj" in k or k.startswith(("layers.", "vit.layers.")) for k in sd)
        ref = hf_from_files(ref, sd, tmp_path / "hf")
    path = save(sd, tmp_path / "model.safetensors")
    dinov2, registers = arch.startswith("Dinov2"), "WithRegisters" in arch
    for size in SIZES:
        model = vit.load_vit(path, image_size=size)
        cfg = model.cfg
        assert model.layout == "huggingface" + ("-dinov2" if dinov2 else "") + ("-registers" if registers else "")
        assert (cfg.registers, cfg.layer_scale, cfg.eps) == ((4 if registers else 0), dinov2, 1e-6 if dinov2 else 1e-12)
        assert cfg.pos_resize == ("bicubic-antialias" if registers else "bicubic")
        assert cfg.mean == (vit.IMAGENET_MEAN if dinov2 else (0.5,) * 3)
        x = torch.randn(2, 3, size, size)
        check_hidden(model, hf_hidden_states(ref, x), x, f"{arch} ({names}) at {size} px")


@pytest.mark.parametrize("size", SIZES[1:])
def test_torchvision_resize_matches_torchvision(tmp_path, size):
    tv_vit = pytest.importorskip("torchvision.models.vision_transformer")
    ref = torchvision_vit()
    path = save(ref.state_dict(), tmp_path / "tv.safetensors")
    resized = torchvision_vit(image_size=size)  # torchvision's own way to the new size
    resized.load_state_dict(tv_vit.interpolate_embeddings(size, 8, ref.state_dict()))
    x = torch.randn(2, 3, size, size)
    check_hidden(vit.load_vit(path, image_size=size), torchvision_hidden_states(resized, x), x,
                 f"torchvision at {size} px")


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", SIZES[1:])
def test_timm_resize_matches_timm(tmp_path, size, registers):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    kw = dict(patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2, num_classes=0)
    if registers:  # DINOv2 reg4: LayerScale, registers, position table over the patches only
        kw |= dict(init_values=1e-5, reg_tokens=registers, no_embed_class=True)
    ref = randomize(timm_vit.VisionTransformer(img_size=32, **kw))
    path = save(ref.state_dict(), tmp_path / "timm.safetensors")
    resized = timm_vit.VisionTransformer(img_size=size, **kw).eval()  # what timm.create_model(img_size=size) loads
    resized.load_state_dict(timm_vit.checkpoint_filter_fn(ref.state_dict(), resized))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        hidden = [resized.norm_pre(resized._pos_embed(resized.patch_embed(x)))]
        for block in resized.blocks:
            hidden.append(block(hidden[-1]))
    check_hidden(vit.load_vit(path, image_size=size), hidden, x, f"timm ({registers} registers) at {size} px")


def gap(model, reference_hidden, x) -> tuple[float, float]:
    """(worst relative difference over the hidden states, cosine of the last ones, per image, averaged)."""
    with torch.no_grad():
        ours = model(x)
    worst = max(relative_diff(a, b) for a, b in zip(ours, reference_hidden, strict=True))
    cos = F.cosine_similarity(ours[-1].flatten(1), reference_hidden[-1].flatten(1)).mean().item()
    return worst, cos


def test_each_family_resized_its_own_way_before_and_after(tmp_path):
    """Each family's position table resized its own library's way, against timm's resize used for every family, on
    the tiny 32 px ViT (8 px patches, width 128, 3 blocks) in Hugging Face and torchvision layout."""
    tv_vit = pytest.importorskip("torchvision.models.vision_transformer")
    transformers = pytest.importorskip("transformers")
    tv = torchvision_vit(eps=1e-12)
    hf_path = save(tv_to_hf(tv.state_dict(), head_model=False), tmp_path / "hf.safetensors")
    hf_ref = hf_from_files(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256, image_size=32,
        patch_size=8, layer_norm_eps=1e-12)), tv_to_hf(tv.state_dict(), head_model=False), tmp_path / "hf")
    tv = torchvision_vit()
    tv_path = save(tv.state_dict(), tmp_path / "tv.safetensors")
    cases = []
    for size in (64, 24):
        x = torch.randn(4, 3, size, size)
        cases.append((f"HF ViT 32 -> {size} px", hf_path, size, x, hf_hidden_states(hf_ref, x)))
    resized = torchvision_vit(image_size=64)
    resized.load_state_dict(tv_vit.interpolate_embeddings(64, TINY_VIT["patch_size"], tv.state_dict()))
    x = torch.randn(4, 3, 64, 64)
    cases.append(("torchvision 32 -> 64 px", tv_path, 64, x, torchvision_hidden_states(resized, x)))
    for label, path, size, x, reference in cases:
        before = gap(vit.with_image_size(vit.load_vit(path), size, "bicubic-antialias"), reference, x)
        after = gap(vit.load_vit(path, image_size=size), reference, x)
        print(f"{label}: timm's resize {before[0]:.1%} relative (last-layer cosine {before[1]:.4f}); "
              f"the library's own {after[0]:.1e} (cosine {after[1]:.6f})")
        assert after[0] < TOL and before[0] > 100 * TOL, label


def test_resize_method_survives_the_run_config(tmp_path):
    """train.py writes asdict(teacher.cfg) and asdict(student_config(...)) into config.json."""
    model = vit.load_vit(save(torchvision_vit().state_dict(), tmp_path / "tv.safetensors"), image_size=48)
    assert asdict(model.cfg)["pos_resize"] == "bicubic-align-corners"
    assert asdict(vit.student_config(model.cfg))["pos_resize"] == "bicubic-align-corners"
    assert vit.ViTConfig(**asdict(model.cfg)) == model.cfg


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


## --------------------------------------------------------------------------------------------------------
## What the checkpoint's folder says: config.json beside a Hugging Face model.safetensors; the assumption where
## nothing says it (a bare timm or torchvision file), and --teacher-heads.

@pytest.mark.parametrize("arch, extra", [("ViTModel", dict(intermediate_size=192)), ("Dinov2Model", {})])
def test_a_hugging_face_folder_runs_as_its_config_json_says(tmp_path, arch, extra):
    """Width 96 in 3 heads of 32 (the 64-dims rule would give 1 head) and LayerNorm eps 1e-5 (not the family's):
    only config.json says either."""
    ref = hf_model(arch, hidden_size=96, num_attention_heads=3, layer_norm_eps=1e-5, **extra)
    ref.save_pretrained(tmp_path / "m")  # model.safetensors + config.json, as a hub snapshot holds them
    model = vit.load_vit(tmp_path / "m" / "model.safetensors")
    assert (model.cfg.heads, model.cfg.eps) == (3, 1e-5) and model.described["heads"] == "config.json"
    x = torch.randn(2, 3, 32, 32)
    check_hidden(model, hf_hidden_states(ref, x), x, f"{arch} width 96, 3 heads, from its folder")
    with pytest.raises(vit.CheckpointError, match="--teacher-heads 6, but .*config.json says 3 heads"):
        vit.load_vit(tmp_path / "m" / "model.safetensors", heads=6)


def test_what_a_folder_says_that_this_vit_cannot_run_is_one_line(tmp_path):
    ref = hf_model("ViTModel", hidden_size=96, num_attention_heads=3, intermediate_size=192)
    for key, value, fragment in [("hidden_act", "gelu_new", r"hidden_act 'gelu_new': this project's ViT runs the exact "
                                                            r"\(erf\) GELU only"),
                                 ("hidden_act", "quick_gelu", "hidden_act 'quick_gelu'"),
                                 ("qkv_bias", False, "the model has no q/k/v bias"),
                                 ("hidden_size", 768, "hidden_size 768, but .* holds width 96: the config.json is "
                                                      "another model's")]:
        folder = tmp_path / f"{key}-{value}"
        ref.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text()) | {key: value}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(vit.CheckpointError, match=fragment):
            vit.load_vit(folder / "model.safetensors")


def test_a_bare_timm_file_says_its_assumption_and_takes_teacher_heads(tmp_path):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    ref = randomize(timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3,
                                               mlp_ratio=2, num_classes=0))
    path = save(ref.state_dict(), tmp_path / "bare.safetensors")  # no folder around it: nothing says 3 heads
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = [ref._pos_embed(ref.patch_embed(x))]
        for block in ref.blocks:
            hidden.append(block(hidden[-1]))
    assumed = vit.load_vit(path)
    assert assumed.cfg.heads == 1  # the assumption says what it is: 96 is no multiple of 64
    assert assumed.described["heads"] == \
        "assumed: one head of all 96 dims (96 is no multiple of the usual 64 dims per head)"
    told = vit.load_vit(path, heads=3)
    assert told.described["heads"] == "--teacher-heads"
    check_hidden(told, hidden, x, "bare timm file, --teacher-heads 3")
    with pytest.raises(vit.CheckpointError, match=r"width 96 cannot be split into 5 attention heads "
                       r"\(--teacher-heads\): choose one that divides it \(6, 8, 12, 16, 24, 32, \.\.\.\)"):
        vit.load_vit(path, heads=5)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_custom", "pretrained_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, "model_args": {"num_heads": 3}}))  # timm's hub folder
    described = vit.load_vit(path)
    assert described.cfg.heads == 3 and described.cfg.mean == (0.5,) * 3
    assert described.described == {"heads": "config.json model_args", "mean": "config.json", "std": "config.json"}
