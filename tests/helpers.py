"""Reference models with random weights, written to .safetensors in each library's key layout.

Nothing can be downloaded where the tests run, so every checkpoint layout of shared/docs/checkpoints.md is
built here from the reference library's own module (torchvision, timm) and renamed by the key tables there.
"""
from functools import partial

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

TINY_VIT = dict(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=128, mlp_dim=256)


def randomize(model: nn.Module, seed=0) -> nn.Module:
    """Random values in every tensor, LayerNorm gains included, so a mix-up of any two tensors shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def torchvision_vit(eps=1e-6, seed=0, **kw) -> torchvision.models.VisionTransformer:
    cfg = dict(TINY_VIT, **kw)
    model = torchvision.models.VisionTransformer(**cfg, norm_layer=partial(nn.LayerNorm, eps=eps))
    return randomize(model, seed)


def torchvision_hidden_states(model, x) -> list[torch.Tensor]:
    """The reference hidden states: embedding output, then each encoder layer's output (before encoder.ln)."""
    with torch.no_grad():
        h = model._process_input(x)
        h = torch.cat([model.class_token.expand(x.shape[0], -1, -1), h], dim=1) + model.encoder.pos_embedding
        hidden = [h]
        for layer in model.encoder.layers:
            hidden.append(layer(hidden[-1]))
    return hidden


def tv_to_timm(sd: dict) -> dict:
    """torchvision ViT keys -> timm keys (checkpoints.md sections 3-4)."""
    out = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"],
           "patch_embed.proj.weight": sd["conv_proj.weight"], "patch_embed.proj.bias": sd["conv_proj.bias"],
           "norm.weight": sd["encoder.ln.weight"], "norm.bias": sd["encoder.ln.bias"],
           "head.weight": sd["heads.head.weight"], "head.bias": sd["heads.head.bias"]}
    i = 0
    while f"encoder.layers.encoder_layer_{i}.ln_1.weight" in sd:
        a, b = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[f"{b}norm1.{t}"] = sd[f"{a}ln_1.{t}"]
            out[f"{b}attn.qkv.{t}"] = sd[f"{a}self_attention.in_proj_{t}"]
            out[f"{b}attn.proj.{t}"] = sd[f"{a}self_attention.out_proj.{t}"]
            out[f"{b}norm2.{t}"] = sd[f"{a}ln_2.{t}"]
            out[f"{b}mlp.fc1.{t}"] = sd[f"{a}mlp.0.{t}"]
            out[f"{b}mlp.fc2.{t}"] = sd[f"{a}mlp.3.{t}"]
        i += 1
    return out


def tv_to_hf(sd: dict, head_model: bool) -> dict:
    """torchvision ViT keys -> Hugging Face ViTModel keys; ViTForImageClassification adds 'vit.' + classifier."""
    t = tv_to_timm(sd)
    D = t["cls_token"].shape[-1]
    out = {"embeddings.cls_token": t["cls_token"], "embeddings.position_embeddings": t["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
           "layernorm.weight": t["norm.weight"], "layernorm.bias": t["norm.bias"]}
    i = 0
    while f"blocks.{i}.norm1.weight" in t:
        a, b = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = t[f"{a}attn.qkv.{p}"].split(D)  # rows [0:D] q, [D:2D] k, [2D:3D] v
            out |= {f"{b}attention.attention.query.{p}": q, f"{b}attention.attention.key.{p}": k,
                    f"{b}attention.attention.value.{p}": v,
                    f"{b}layernorm_before.{p}": t[f"{a}norm1.{p}"],
                    f"{b}attention.output.dense.{p}": t[f"{a}attn.proj.{p}"],
                    f"{b}layernorm_after.{p}": t[f"{a}norm2.{p}"],
                    f"{b}intermediate.dense.{p}": t[f"{a}mlp.fc1.{p}"],
                    f"{b}output.dense.{p}": t[f"{a}mlp.fc2.{p}"]}
        i += 1
    if head_model:
        out = {"vit." + k: v for k, v in out.items()}
        out |= {"classifier.weight": torch.randn(10, D), "classifier.bias": torch.randn(10)}
    else:
        out |= {"pooler.dense.weight": torch.randn(D, D), "pooler.dense.bias": torch.randn(D)}
    return out


def save(tensors: dict, path) -> str:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def vit_teacher_file(path, seed=0, **kw) -> str:
    """A small random ViT teacher in torchvision layout (the default for end-to-end tests)."""
    return save(torchvision_vit(seed=seed, **kw).state_dict(), path)


def vgg16_file(path, seed=0) -> str:
    """A random-weight torchvision VGG16 (features only: the classifier is 120M parameters nobody uses)."""
    torch.manual_seed(seed)
    feats = torchvision.models.vgg16().features
    return save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def image_folder(root, classes=("ant", "bee", "cow"), n_train=30, n_test=10, size=32, seed=0) -> str:
    """A tiny image folder root/{train,test}/<class>/NNN.png. Each class has its own mean colour (so there is
    something to learn), and pixel (0, 0) holds (class, split, index): every image can be told apart."""
    import numpy as np
    from PIL import Image
    from pathlib import Path
    rng = np.random.default_rng(seed)
    for s, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        for c, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(rng.normal(50 + 70 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                img[0, 0] = (c, s, i)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return str(root)
