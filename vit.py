"""A Vision Transformer written out by hand, and a loader for the teacher checkpoints KDAD uses.

Follows "An Image is Worth 16x16 Words" (Dosovitskiy et al., arXiv 2010.11929), section 3.1, with the names of
timm's VisionTransformer (patch_embed, cls_token, pos_embed, blocks, norm), so timm checkpoints load as they are
and the Hugging Face and torchvision layouts are renamed into it:

    image (B, 3, H, W) -> patches (B, N, D) -> [CLS, registers, patches] + position -> L pre-norm blocks

`ViT.forward` returns the hidden states [h0, h1, ..., hL] that KDAD distils (h0 = embedded tokens, hi = output
of block i, all before the final LayerNorm; Hugging Face's `hidden_states` convention).

    model = load_vit("model.safetensors", image_size=224)   # any of the layouts in shared/docs/checkpoints.md
    hidden = model(images)                                  # list of L + 1 tensors, each (B, tokens, width)
    student = ViT(student_config(model.cfg))                # the KDAD student, token for token like the teacher
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, check_finite, check_state_dict, read_tensors

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # Hugging Face ViT's image processor maps pixels to [-1, 1]


@dataclass
class ViTConfig:
    """Defaults are ViT-B/16 at 224 px (86M parameters)."""
    image_size: int = 224
    patch_size: int = 16
    width: int = 768          # D, the token width
    depth: int = 12           # L, the number of blocks
    heads: int = 12           # width / heads = 64 for every published ViT
    mlp_width: int = 3072     # 4 * D
    registers: int = 0        # extra learned tokens after CLS (DINOv2 "reg4" variants)
    layer_scale: bool = False  # per-channel gains on each residual branch (DINOv2)
    pos_embed_prefix: bool = True  # position embedding covers CLS/registers too (False: timm no_embed_class)
    final_norm: bool = True   # the checkpoint's last LayerNorm (unused by KDAD, kept so files load exactly)
    eps: float = 1e-6         # LayerNorm epsilon: timm/torchvision 1e-6, Hugging Face 1e-12
    dropout: float = 0.0      # after the embedding, the attention projection and the MLP (the HF positions)
    fused_attn: bool = True   # SDPA kernel; False runs the written-out softmax(QK^T / sqrt(d)) V
    mean: tuple = IMAGENET_MEAN  # input normalisation the weights expect
    std: tuple = IMAGENET_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return 1 + self.registers + self.grid ** 2


class PatchEmbed(nn.Module):
    """Cut the image into patch x patch squares and project each to D: one conv with stride = kernel = patch."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        x = self.proj(x)                     # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # NCHW -> NLC: (B, N, D), patches in row-major order


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows [0:D] = q, [D:2D] = k, [2D:3D] = v)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.fused = cfg.heads, cfg.fused_attn
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                           # 3 x (B, H, N, d)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            ## every token scores every other token by a scaled dot product; softmax turns scores into weights
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
            x = attn.softmax(dim=-1) @ v                            # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)  # heads side by side again: (B, N, D)
        return self.drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as in all three libraries


class LayerScale(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), 1e-5))  # DINOv2's init_values

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (paper eq. 2-3)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ViTConfig()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.registers, cfg.width)) if cfg.registers else None
        pos_tokens = cfg.tokens if cfg.pos_embed_prefix else cfg.grid ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_tokens, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.final_norm else None
        self.apply(_init_weights)
        for p in (self.cls_token, self.reg_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def embed(self, x):
        """(B, 3, H, W) -> h0 = [CLS, registers, patches] with position embedding: (B, tokens, D)."""
        x = self.patch_embed(x)  # (B, N, D)
        B = x.shape[0]
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.cfg.pos_embed_prefix:  # concatenate, then add (original ViT, HF, torchvision)
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        else:                          # add to the patches only, then concatenate (DINOv2 with registers)
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        return self.drop(x)

    def forward(self, x) -> list[torch.Tensor]:
        hidden = [self.embed(x)]
        for block in self.blocks:
            hidden.append(block(hidden[-1]))
        return hidden  # L + 1 tensors of shape (B, tokens, D), before the final LayerNorm


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def set_fused_attn(model: nn.Module, fused: bool):
    """Switch every Attention of a model between the SDPA kernel and the written-out path."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused = fused


## --------------------------------------------------------------------------------------------------------
## The KDAD student (method.md, ViT recipe): 4 blocks, 8 heads, MLP width 512, dropout 0.2, trained from scratch.
## Width, patch size, image size and register count are the teacher's, so hidden state i of the student has
## exactly the shape (B, tokens, D) of the teacher hidden state it is matched against.

def student_config(teacher: ViTConfig, depth=4, heads=8, mlp_width=512, dropout=0.2) -> ViTConfig:
    # 4 blocks x (4 D^2 + 2 x 512 D) + patch and position embeddings: 13.4M parameters for D = 768 at 224 px
    if teacher.width % heads:
        raise CheckpointError(f"teacher width {teacher.width} cannot be split into {heads} student heads: choose a "
                              f"teacher whose width is a multiple of {heads}")
    return replace(teacher, depth=depth, heads=heads, mlp_width=mlp_width, dropout=dropout, layer_scale=False,
                   pos_embed_prefix=True, final_norm=False)


## --------------------------------------------------------------------------------------------------------
## Checkpoint layouts (shared/docs/checkpoints.md). Each is renamed into the timm names used above.

def _hf_to_ours(sd: dict) -> dict:
    """Hugging Face ViTModel / ViTForImageClassification: separate q, k, v; 'vit.' prefix on head models."""
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    out = {"cls_token": sd.pop("embeddings.cls_token"),
           "pos_embed": sd.pop("embeddings.position_embeddings"),
           "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias")}
    for i in range(_depth(sd, "encoder.layer.")):
        a, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[b + "attn.qkv." + t] = torch.cat([sd.pop(f"{a}attention.attention.{n}.{t}")
                                                  for n in ("query", "key", "value")])
            for src, dst in (("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"),
                             ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2")):
                out[f"{b}{dst}.{t}"] = sd.pop(f"{a}{src}.{t}")
    for t in ("weight", "bias"):
        if f"layernorm.{t}" in sd:
            out[f"norm.{t}"] = sd.pop(f"layernorm.{t}")
    return out | sd  # whatever is left is checked (and refused unless ignorable) by the caller


def _torchvision_to_ours(sd: dict) -> dict:
    """torchvision VisionTransformer: nn.MultiheadAttention packs q, k, v along dim 0 like timm's qkv."""
    out = {"cls_token": sd.pop("class_token"), "pos_embed": sd.pop("encoder.pos_embedding"),
           "patch_embed.proj.weight": sd.pop("conv_proj.weight"), "patch_embed.proj.bias": sd.pop("conv_proj.bias")}
    for i in range(_depth(sd, "encoder.layers.encoder_layer_")):
        a, b = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[f"{b}attn.qkv.{t}"] = sd.pop(f"{a}self_attention.in_proj_{t}")
            for src, dst in (("ln_1", "norm1"), ("self_attention.out_proj", "attn.proj"), ("ln_2", "norm2"),
                             ("mlp.0", "mlp.fc1"), ("mlp.3", "mlp.fc2")):
                legacy = {"mlp.0": "mlp.linear_1", "mlp.3": "mlp.linear_2"}.get(src)  # state-dict version < 2
                key = f"{a}{src}.{t}" if f"{a}{src}.{t}" in sd or not legacy else f"{a}{legacy}.{t}"
                out[f"{b}{dst}.{t}"] = sd.pop(key)
    for t in ("weight", "bias"):
        out[f"norm.{t}"] = sd.pop(f"encoder.ln.{t}")
    return out | sd


def _depth(sd: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


# (marker key, renamer, LayerNorm eps, mean/std, keys that are not part of the backbone)
LAYOUTS = {
    "huggingface": ("embeddings.patch_embeddings.projection.weight", _hf_to_ours, 1e-12, (HALF, HALF),
                    ("classifier.", "pooler.", "embeddings.mask_token")),
    "timm": ("patch_embed.proj.weight", lambda sd: sd, 1e-6, (IMAGENET_MEAN, IMAGENET_STD),
             ("head.", "fc_norm.", "mask_token")),
    "torchvision": ("conv_proj.weight", _torchvision_to_ours, 1e-6, (IMAGENET_MEAN, IMAGENET_STD), ("heads.",)),
}


def detect_layout(path, sd: dict) -> str:
    for name, (marker, *_) in LAYOUTS.items():
        if marker in sd or "vit." + marker in sd:
            return name
    raise CheckpointError(f"{path} is not a ViT checkpoint this project reads (Hugging Face ViT, timm ViT, "
                          f"torchvision vit_b_16); first keys: {', '.join(sorted(sd)[:3])}")


# Heads are not in any tensor's shape. Published ViTs use 64 dims per head (Ti 192/3, S 384/6, B 768/12,
# L 1024/16, DINOv2-g 1536/24) except these, which have 16 heads of 80, 88 and 104 dims (ViT-H, -g, -G).
HEADS = {1280: 16, 1408: 16, 1664: 16}


def _config_from_tensors(sd: dict, eps: float, mean_std) -> ViTConfig:
    """Everything but the head count is in the shapes; heads come from HEADS or 64 dims per head."""
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    registers = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    n_pos = sd["pos_embed"].shape[1]
    prefix_free = math.isqrt(n_pos) ** 2 == n_pos  # pos_embed over the patches only (timm no_embed_class)
    grid = math.isqrt(n_pos if prefix_free else n_pos - 1 - registers)
    if not prefix_free and grid ** 2 != n_pos - 1 - registers:
        raise CheckpointError(f"position embedding has {n_pos} tokens: not a square grid of patches plus CLS and "
                              f"{registers} registers, so no student can line up with it token for token")
    return ViTConfig(image_size=grid * patch, patch_size=patch, width=width, depth=_depth(sd, "blocks."),
                     heads=HEADS.get(width, max(1, width // 64)), mlp_width=sd["blocks.0.mlp.fc1.weight"].shape[0],
                     registers=registers, layer_scale="blocks.0.ls1.gamma" in sd, pos_embed_prefix=not prefix_free,
                     final_norm="norm.weight" in sd or "norm.bias" in sd, eps=eps, mean=mean_std[0], std=mean_std[1])


def resample_pos_embed(pos_embed, old_grid: int, new_grid: int, prefix: int):
    """Resize the patch part of a position embedding to a new grid (bicubic + antialias, as timm does)."""
    if old_grid == new_grid:
        return pos_embed
    cls, patches = pos_embed[:, :prefix], pos_embed[:, prefix:]
    D = pos_embed.shape[-1]
    patches = patches.float().reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D)         # (1, g'^2, D)
    return torch.cat([cls, patches.to(pos_embed.dtype)], dim=1)


def load_vit(path, image_size: int | None = None, heads: int | None = None) -> ViT:
    """Build the ViT a .safetensors file describes, load every tensor, return it in eval mode."""
    sd = read_tensors(path)
    layout = detect_layout(path, sd)
    marker, rename, eps, mean_std, ignore = LAYOUTS[layout]
    check_finite(path, {k: v for k, v in sd.items() if not k.removeprefix("vit.").startswith(ignore)})
    try:
        sd = rename(dict(sd))
        cfg = _config_from_tensors(sd, eps, mean_std)
    except KeyError as e:
        raise CheckpointError(f"{path}: {layout} ViT checkpoint misses tensor {e.args[0]}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if heads:
        cfg = replace(cfg, heads=heads)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    model = ViT(cfg)
    check_state_dict(path, sd, model.state_dict(), f"{layout} ViT")
    model.load_state_dict(sd)
    if image_size and image_size != cfg.image_size:
        model = with_image_size(model, image_size)
    model.layout = layout
    return model.eval()


def with_image_size(model: ViT, image_size: int) -> ViT:
    """The same network for another input size: the position embedding is resampled to the new grid."""
    cfg = model.cfg
    if image_size % cfg.patch_size:
        fit = image_size // cfg.patch_size * cfg.patch_size
        raise CheckpointError(f"image size {image_size} is not a multiple of the teacher's patch size "
                              f"{cfg.patch_size}; use e.g. --image-size {fit}")
    new = ViT(replace(cfg, image_size=image_size))
    sd = model.state_dict()
    prefix = 1 + cfg.registers if cfg.pos_embed_prefix else 0
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], cfg.grid, new.cfg.grid, prefix)
    new.load_state_dict(sd)
    return new
