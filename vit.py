"""A Vision Transformer written out by hand: the teacher network KDAD distils, and its student.

Follows "An Image is Worth 16x16 Words" (Dosovitskiy et al., arXiv 2010.11929), section 3.1, with the names of
timm's VisionTransformer (patch_embed, cls_token, pos_embed, blocks, norm), so timm checkpoints load as they are.
DINOv2's LayerScale (Oquab et al., arXiv 2304.07193) and registers (Darcet et al., arXiv 2309.16588) are options of
the same blocks:

    image (B, 3, H, W) -> patches (B, N, D) -> [CLS, registers, patches] + position -> L pre-norm blocks

`ViT.forward` returns the hidden states [h0, h1, ..., hL] that KDAD distils (h0 = embedded tokens, hi = output
of block i, all before the final LayerNorm; Hugging Face's `hidden_states` convention).

    model = load_vit("model.safetensors", image_size=224)   # timm, Hugging Face or torchvision files (layouts.py)
    hidden = model(images)                                  # list of L + 1 tensors, each (B, tokens, width)
    student = ViT(student_config(model.cfg))                # the KDAD student, token for token like the teacher

Read in order: ViTConfig, PatchEmbed, Attention, Block, ViT (embed, forward), student_config, then
resample_pos_embed (another input size). The files' key names are renamed in layouts.py, which a first reading
can skip.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, check_state_dict
from layouts import IMAGENET_MEAN, IMAGENET_STD, read_vit_checkpoint


@dataclass
class ViTConfig:
    """Defaults are ViT-B/16 at 224 px (86M parameters)."""
    image_size: int = 224
    patch_size: int = 16
    width: int = 768          # D, the token width
    depth: int = 12           # L, the number of blocks
    heads: int = 12           # width / heads = 64 for most published ViTs (ViT-H/g/G: layouts.HEADS)
    mlp_width: int = 3072     # 4 * D
    registers: int = 0        # extra learned tokens after CLS (DINOv2 "reg4" variants)
    layer_scale: bool = False  # per-channel gains on each residual branch (DINOv2)
    pos_embed_prefix: bool = True  # position embedding covers CLS/registers too (False: timm no_embed_class)
    pos_resize: str = "bicubic-antialias"  # how the position table is resized to another size (POS_RESIZE key)
    final_norm: bool = True   # the checkpoint's last LayerNorm (unused by KDAD, kept so files load exactly)
    eps: float = 1e-6         # LayerNorm epsilon: timm, torchvision, DINOv2 1e-6; Hugging Face ViT 1e-12
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
## The KDAD student (the ViT reproduction's): 4 blocks, 8 heads, MLP width 512, dropout 0.2, trained from scratch.
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
## Another input size: the position table is a (g x g) grid of learned vectors, one per patch; a larger or
## smaller image has more or fewer patches, so the grid is resized like an image. All three libraries interpolate
## the patch part on its (D, g, g) grid with bicubic kernels (timm and Dinov2 in float32, the others in the table's
## own dtype: the same for float32 files, as every teacher here is read) and keep the prefix (CLS) positions, but:
## - plain bicubic (a = -0.75, align_corners=False): Hugging Face ViT and Dinov2 (`interpolate_pos_encoding`);
## - antialias=True switches PyTorch to PIL's bicubic (a = -0.5, widened when shrinking): timm's
##   `resample_abs_pos_embed` and Hugging Face Dinov2WithRegisters;
## - align_corners=True maps the corner patches onto each other: torchvision's `interpolate_embeddings`.
## On trained weights the choice matters: a DINOv2 ViT-S/14 (518 px file) run at 224 px differs from itself by 9%
## per hidden state between plain and antialiased bicubic (tests/test_onnx.py), so each file is resized the way the
## library it came from would resize it.
POS_RESIZE = {"bicubic": {}, "bicubic-antialias": {"antialias": True}, "bicubic-align-corners": {"align_corners": True}}


def resample_pos_embed(pos_embed, old_grid: int, new_grid: int, prefix: int, method="bicubic-antialias"):
    """Resize the patch part of a position table (1, prefix + old_grid^2, D) to new_grid^2 patches, in float32, with
    one of the POS_RESIZE methods; the first `prefix` rows (CLS, registers) are kept as they are."""
    if old_grid == new_grid:
        return pos_embed
    cls, patches = pos_embed[:, :prefix], pos_embed[:, prefix:]
    D = pos_embed.shape[-1]
    patches = patches.float().reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", **POS_RESIZE[method])
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D)         # (1, g'^2, D)
    return torch.cat([cls, patches.to(pos_embed.dtype)], dim=1)


def with_image_size(model: ViT, image_size: int, pos_resize: str | None = None) -> ViT:
    """The same network for another input size: the position table is resampled to the new grid the way
    model.cfg.pos_resize says (the file's library's way), or with `pos_resize` (a POS_RESIZE key) if given."""
    cfg = replace(model.cfg, pos_resize=pos_resize or model.cfg.pos_resize)
    if image_size % cfg.patch_size:
        fit = image_size // cfg.patch_size * cfg.patch_size
        raise CheckpointError(f"image size {image_size} is not a multiple of the teacher's patch size "
                              f"{cfg.patch_size}; use e.g. --image-size {fit}")
    with torch.device("meta"):
        new = ViT(replace(cfg, image_size=image_size))
    sd = {k: v.clone() for k, v in model.state_dict().items()}  # the new network shares nothing with the old
    prefix = 1 + cfg.registers if cfg.pos_embed_prefix else 0
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], cfg.grid, new.cfg.grid, prefix, cfg.pos_resize)
    new.load_state_dict(sd, assign=True)
    new.layout, new.described = getattr(model, "layout", None), getattr(model, "described", {})
    return new.train(model.training)


## --------------------------------------------------------------------------------------------------------
## A teacher from a file.

def load_vit(path, image_size: int | None = None, heads: int | None = None) -> ViT:
    """The ViT a .safetensors file describes (any layouts.LAYOUTS layout, with what the files beside it say:
    layouts.described), every tensor loaded, in eval mode, at `image_size` (the file's own if None: the position
    table is resized the way the file's library does it). heads: the number of attention heads where nothing
    beside the file says it (no tensor's shape does; default: layouts.assumed_heads). model.described says where
    each field not read from the tensors came from. Raises CheckpointError naming the file and the first offending
    tensors, or a head count that contradicts the file's config.json or does not divide its width."""
    sd, fields, layout, what, sources = read_vit_checkpoint(path)  # tensors under our names, config from them
    if heads and heads != fields["heads"] and sources["heads"].startswith("config.json"):
        raise CheckpointError(f"--teacher-heads {heads}, but {path}'s {sources['heads']} says "
                              f"{fields['heads']} heads: leave --teacher-heads out")
    if heads:
        fields, sources = fields | {"heads": heads}, sources | {"heads": "--teacher-heads"}
    if fields["width"] % fields["heads"]:
        width = fields["width"]
        fits = [h for h in range(1, 33) if width % h == 0]
        advice = ("choose one that divides it" if heads else "pass the head count with --teacher-heads N") + \
            f" ({', '.join(map(str, fits[-6:]))}, ...)"
        raise CheckpointError(f"{path}: width {width} cannot be split into {fields['heads']} attention heads "
                              f"({sources['heads']}): {advice}")
    cfg = ViTConfig(**fields)
    with torch.device("meta"):  # shapes only: the random init would all be overwritten (seconds for a ViT-B)
        model = ViT(cfg)
    check_state_dict(path, sd, model.state_dict(), what)
    model.load_state_dict(sd, assign=True)
    model.layout, model.described = layout, sources
    if image_size and image_size != cfg.image_size:
        model = with_image_size(model, image_size)
    return model.eval()
