"""A Vision Transformer written out by hand, and a loader for the teacher checkpoints KDAD uses.

Follows "An Image is Worth 16x16 Words" (Dosovitskiy et al., arXiv 2010.11929), section 3.1, with the names of
timm's VisionTransformer (patch_embed, cls_token, pos_embed, blocks, norm), so timm checkpoints load as they are;
Hugging Face (ViT, DINOv2, DINOv2 with registers; transformers 4 or 5 names) and torchvision files are renamed
into it, and DINOv2's LayerScale (Oquab et al., arXiv 2304.07193) and registers (Darcet et al., arXiv 2309.16588)
are options of the same blocks:

    image (B, 3, H, W) -> patches (B, N, D) -> [CLS, registers, patches] + position -> L pre-norm blocks

`ViT.forward` returns the hidden states [h0, h1, ..., hL] that KDAD distils (h0 = embedded tokens, hi = output
of block i, all before the final LayerNorm; Hugging Face's `hidden_states` convention). At another input size than
the file's, the position table is resized the way the file's own library resizes it (POS_RESIZE), so the network
is the one that library would run.

    model = load_vit("model.safetensors", image_size=224)   # any of the layouts LAYOUTS reads
    hidden = model(images)                                  # list of L + 1 tensors, each (B, tokens, width)
    student = ViT(student_config(model.cfg))                # the KDAD student, token for token like the teacher
"""
import math
from dataclasses import dataclass, replace
from functools import partial

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
## Checkpoint layouts (transformers', timm's and torchvision's own key names). Each is renamed into the timm names
## used above.

def _hf_names(dinov2: bool, v5: bool) -> tuple[str, tuple, dict]:
    """Where a Hugging Face block keeps its tensors: (layer prefix, q/k/v modules, {our module: theirs}).
    transformers 5 renamed the modules (q_proj, o_proj, ViT's `layers.N` and mlp.fc1) and reads older files through
    a conversion table; the files on the hub keep the transformers 4 names."""
    if v5:
        qkv, proj = ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj"
    else:
        qkv = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
        proj = "attention.output.dense"
    if dinov2:  # Dinov2Layer: norm1, attention, layer_scale1, norm2, mlp, layer_scale2 (the same in both versions)
        names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    elif v5:
        names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    else:
        names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                 "mlp.fc2": "output.dense"}
    return ("layers." if v5 and not dinov2 else "encoder.layer."), qkv, names | {"attn.proj": proj}


def _is_v5(sd: dict) -> bool:
    return any(".attention.q_proj." in k for k in sd)


def _hf_to_ours(sd: dict, dinov2=False, registers=False) -> dict:
    """Hugging Face ViTModel, Dinov2Model or Dinov2WithRegistersModel (head models' prefix already removed):
    separate q, k, v concatenated into one qkv, LayerScale lambda1 -> gamma."""
    layer, qkv, names = _hf_names(dinov2, _is_v5(sd))
    out = {"cls_token": sd.pop("embeddings.cls_token"),
           "pos_embed": sd.pop("embeddings.position_embeddings"),
           "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias")}
    if registers:
        ## Dinov2WithRegisters embeds [CLS + pos[0], registers, patches + pos[1:]]: registers get no position, CLS
        ## does. Adding pos[0] to the CLS token here is the very float add HF does at run time, so the table can
        ## cover the patches only (pos_embed_prefix=False, as timm converts these files) and stay exact.
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
        out["reg_token"] = sd.pop("embeddings.register_tokens")
    depth = _depth(sd, layer)
    if not depth:
        raise CheckpointError(f"no encoder layers ({layer}N.*) found")
    for i in range(depth):
        a, b = f"{layer}{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[f"{b}attn.qkv.{t}"] = torch.cat([sd.pop(f"{a}{n}.{t}") for n in qkv])  # rows q, k, v as in timm
            for ours, theirs in names.items():
                out[f"{b}{ours}.{t}"] = sd.pop(f"{a}{theirs}.{t}")
        if dinov2:
            out[f"{b}ls1.gamma"] = sd.pop(f"{a}layer_scale1.lambda1")
            out[f"{b}ls2.gamma"] = sd.pop(f"{a}layer_scale2.lambda1")
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


@dataclass(frozen=True)
class Layout:
    """One library's way of storing (and running) a ViT."""
    what: str         # what messages call a file of this layout
    rename: object    # file tensors -> our names; leftovers pass through for check_state_dict to name
    eps: float        # the library's LayerNorm epsilon
    mean: tuple       # the input normalisation of the library's image processor / preset
    std: tuple
    pos_resize: str   # how the library resizes the position table to another input size (a POS_RESIZE key)
    ignore: tuple     # prefixes of tensors that are not part of the backbone (heads, pooler, mask token)


HF_IGNORE = ("classifier.", "pooler.", "embeddings.mask_token")
LAYOUTS = {
    "huggingface": Layout("Hugging Face ViTModel", _hf_to_ours, 1e-12, HALF, HALF, "bicubic", HF_IGNORE),
    "huggingface-dinov2": Layout("Hugging Face Dinov2Model", partial(_hf_to_ours, dinov2=True), 1e-6,
                                 IMAGENET_MEAN, IMAGENET_STD, "bicubic", HF_IGNORE),
    "huggingface-dinov2-registers": Layout("Hugging Face Dinov2WithRegistersModel",
                                           partial(_hf_to_ours, dinov2=True, registers=True), 1e-6,
                                           IMAGENET_MEAN, IMAGENET_STD, "bicubic-antialias", HF_IGNORE),
    "timm": Layout("timm VisionTransformer", lambda sd: sd, 1e-6, IMAGENET_MEAN, IMAGENET_STD, "bicubic-antialias",
                   ("head.", "fc_norm.", "mask_token")),
    "torchvision": Layout("torchvision VisionTransformer", _torchvision_to_ours, 1e-6, IMAGENET_MEAN, IMAGENET_STD,
                          "bicubic-align-corners", ("heads.",)),
}
HF_MARKER = "embeddings.patch_embeddings.projection.weight"
# head models (ForImageClassification ...) nest the backbone under its name; "deit." files are refused by name below
HF_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.", "deit.")


def _strip_hf_prefix(sd: dict) -> dict:
    for p in HF_PREFIXES:
        if p + HF_MARKER in sd:
            return {k.removeprefix(p): v for k, v in sd.items()}
    return sd


def detect_layout(path, sd: dict) -> str:
    """The LAYOUTS key of a file's tensors (HF head-model prefixes removed); CheckpointError for anything else."""
    if HF_MARKER in sd:
        if "embeddings.register_tokens" in sd:
            return "huggingface-dinov2-registers"
        if any(".layer_scale1." in k or k.endswith(".norm1.weight") for k in sd):
            return "huggingface-dinov2"
        return "huggingface"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    if "conv_proj.weight" in sd:
        return "torchvision"
    raise CheckpointError(f"{path} is not a ViT checkpoint this project reads (Hugging Face ViT / DINOv2, timm ViT, "
                          f"torchvision ViT); first keys: {', '.join(sorted(sd)[:3])}")


# ViT variants whose extra parts this ViT does not have: (what gives them away in a file's own names, what the
# file is, what to do). SwiGLU: the original / timm w12, transformers 4 weights_in, transformers 5 gate_proj.
VARIANTS = [((".mlp.w12.", ".mlp.weights_in.", ".mlp.gate_proj."),
             "a ViT with a gated (SwiGLU) MLP, like DINOv2 ViT-g/14", "the GELU MLP of ViT-S/B/L; use one of those"),
            (("dist_token", "embeddings.distillation_token"), "a distilled DeiT (a distillation token beside CLS)",
             "one CLS token and no distillation token; use a ViT without one")]


def refuse_variants(path, sd: dict):
    """One line naming what a file is when it is a ViT variant this project cannot run exactly."""
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] != fc2.shape[1]:  # timm's packed SwiGLU: w1, w2 in fc1
        found = [(f"blocks.0.mlp.fc1 gives {fc1.shape[0]} features, fc2 takes {fc2.shape[1]}", *VARIANTS[0][1:])]
    else:
        found = [(k, what, advice) for marks, what, advice in VARIANTS for k in sd if any(m in k for m in marks)]
    if found:
        key, what, advice = found[0]
        raise CheckpointError(f"{path} is {what} ({key}): this project's ViT has {advice}")


# Heads are not in any tensor's shape. Published ViTs use 64 dims per head (Ti 192/3, S 384/6, B 768/12,
# L 1024/16, DINOv2-g 1536/24) except these, which have 16 heads of 80, 88 and 104 dims (ViT-H, -g, -G).
HEADS = {1280: 16, 1408: 16, 1664: 16}


def _config_from_tensors(sd: dict, layout: Layout) -> ViTConfig:
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
                     pos_resize=layout.pos_resize, final_norm="norm.weight" in sd or "norm.bias" in sd,
                     eps=layout.eps, mean=layout.mean, std=layout.std)


## How each library resizes a position table for another input size. All three interpolate the patch part on its
## (D, g, g) grid with bicubic kernels in float32 and keep the prefix (CLS) positions as they are, but:
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


def load_vit(path, image_size: int | None = None, heads: int | None = None) -> ViT:
    """Build the ViT a .safetensors file describes (any LAYOUTS entry, transformers 4 or 5 names), load every tensor
    and return it in eval mode, at `image_size` (the file's own if None: the position table is resized the way the
    file's library does it). Raises CheckpointError naming the file and the first offending tensors."""
    sd = _strip_hf_prefix(read_tensors(path))
    name = detect_layout(path, sd)
    layout = LAYOUTS[name]
    what = layout.what + (" (transformers 5 names)" if name.startswith("huggingface") and _is_v5(sd) else "")
    check_finite(path, {k: v for k, v in sd.items() if not k.startswith(layout.ignore)})
    refuse_variants(path, sd)
    try:
        sd = layout.rename(dict(sd))
        cfg = _config_from_tensors(sd, layout)
    except KeyError as e:
        raise CheckpointError(f"{path}: {what} checkpoint misses tensor {e.args[0]}") from None
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {what}: {message}") from None
    if heads:
        cfg = replace(cfg, heads=heads)
    sd = {k: v for k, v in sd.items() if not k.startswith(layout.ignore)}
    with torch.device("meta"):  # shapes only: the random init would all be overwritten (seconds for a ViT-B)
        model = ViT(cfg)
    check_state_dict(path, sd, model.state_dict(), what)
    model.load_state_dict(sd, assign=True)
    model.layout = name
    if image_size and image_size != cfg.image_size:
        model = with_image_size(model, image_size)
    return model.eval()


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
    new.layout = getattr(model, "layout", None)
    return new.train(model.training)
