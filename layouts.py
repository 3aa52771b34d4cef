"""ViT checkpoint layouts: how transformers, timm and torchvision store a Vision Transformer, renamed into vit.py's
names.

This is plumbing beside vit.py, not part of the method: vit.load_vit calls `read_vit_checkpoint` and gets back the
tensors under timm's names (patch_embed, cls_token, pos_embed, blocks.N.attn.qkv, ...) and the ViTConfig fields the
file implies. Each library's own LayerNorm epsilon, input mean/std and way of resizing the position table come with
its layout, so the network vit.py builds is the one that library would run.

    Hugging Face ViTModel / Dinov2Model / Dinov2WithRegistersModel   (transformers 4 hub names or transformers 5)
    timm VisionTransformer                                          (our names already)
    torchvision VisionTransformer
"""
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from checkpoint import CheckpointError, check_finite, read_tensors

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # Hugging Face ViT's image processor maps pixels to [-1, 1]

## --------------------------------------------------------------------------------------------------------
## Renaming: each library's key names -> timm's (vit.py's).

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
# L 1024/16, DINOv2-g 1536/24) except these, which have 16 heads of 80, 88 and 104 dims (ViT-H, -g, -G). Where the
# checkpoint's folder does not say (described), this rule is an assumption, and the teacher: line says so.
HEADS = {1280: 16, 1408: 16, 1664: 16}


def assumed_heads(width: int) -> tuple[int, str]:
    """(heads, what the teacher: line calls it) where nothing beside the file says the head count."""
    if width in HEADS:
        return HEADS[width], f"assumed, as ViT-H/g/G of width {width} have"
    if width % 64:
        return 1, f"assumed: one head of all {width} dims ({width} is no multiple of the usual 64 dims per head)"
    return width // 64, "assumed: 64 dims per head, as published ViTs have"


def config_from_tensors(sd: dict, layout: Layout) -> dict:
    """ViTConfig fields of a renamed state dict: everything but the head count is in the shapes; heads come from
    assumed_heads (described() replaces it where the checkpoint's folder says it)."""
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    registers = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    n_pos = sd["pos_embed"].shape[1]
    prefix_free = math.isqrt(n_pos) ** 2 == n_pos  # pos_embed over the patches only (timm no_embed_class)
    grid = math.isqrt(n_pos if prefix_free else n_pos - 1 - registers)
    if not prefix_free and grid ** 2 != n_pos - 1 - registers:
        raise CheckpointError(f"position embedding has {n_pos} tokens: not a square grid of patches plus CLS and "
                              f"{registers} registers, so no student can line up with it token for token")
    return dict(image_size=grid * patch, patch_size=patch, width=width, depth=_depth(sd, "blocks."),
                heads=assumed_heads(width)[0], mlp_width=sd["blocks.0.mlp.fc1.weight"].shape[0],
                registers=registers, layer_scale="blocks.0.ls1.gamma" in sd, pos_embed_prefix=not prefix_free,
                pos_resize=layout.pos_resize, final_norm="norm.weight" in sd or "norm.bias" in sd,
                eps=layout.eps, mean=layout.mean, std=layout.std)


## --------------------------------------------------------------------------------------------------------
## What the checkpoint's folder says about it: a Hugging Face folder (save_pretrained, a hub snapshot) has a
## config.json beside model.safetensors (num_attention_heads, layer_norm_eps, hidden_act, image_size, patch_size,
## ...) and may have a preprocessor_config.json (image_mean, image_std); a timm hub folder has a config.json with
## the architecture, its pretrained_cfg (mean, std) and sometimes model_args (num_heads).

HF_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")


def _json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def described(path, name: str, fields: dict) -> tuple[dict, dict]:
    """(ViTConfig fields the files beside `path` give, {field: the file that gave it}) for a checkpoint of layout
    `name` whose tensors give `fields`. Raises CheckpointError with one line where those files describe a network
    this ViT cannot run (another activation than the exact GELU, no q/k/v bias) or another network than the
    tensors (width, depth, patch, image size, registers)."""
    folder = Path(path).parent
    config = _json(folder / "config.json")
    out = {}
    if name.startswith("huggingface") and config.get("model_type") in HF_MODEL_TYPES:
        said = f"{folder / 'config.json'} says"
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"{said} hidden_act {act!r}: this project's ViT runs the exact (erf) GELU only "
                                  f"(hidden_act 'gelu'), so it cannot run {path} as transformers does")
        if config.get("qkv_bias") is False or config.get("use_swiglu_ffn"):
            what = "no q/k/v bias" if config.get("qkv_bias") is False else "a gated (SwiGLU) MLP"
            raise CheckpointError(f"{said} the model has {what}, which this project's ViT does not have")
        for key, field in (("hidden_size", "width"), ("num_hidden_layers", "depth"), ("patch_size", "patch_size"),
                           ("image_size", "image_size"), ("num_register_tokens", "registers")):
            if key in config and config[key] != fields[field]:
                raise CheckpointError(f"{said} {key} {config[key]}, but {path} holds {field} {fields[field]}: the "
                                      f"config.json is another model's; put each model in a folder of its own")
        out |= {"heads": config.get("num_attention_heads"), "eps": config.get("layer_norm_eps")}
        pre = _json(folder / "preprocessor_config.json")
        if pre.get("do_normalize", True) and "image_mean" in pre and "image_std" in pre:
            out |= {"mean": tuple(pre["image_mean"]), "std": tuple(pre["image_std"])}
        source = {"heads": "config.json", "eps": "config.json", "mean": "preprocessor_config.json",
                  "std": "preprocessor_config.json"}
    elif name == "timm" and "architecture" in config:
        pretrained = config.get("pretrained_cfg") or {}
        out |= {"heads": (config.get("model_args") or {}).get("num_heads"), "mean": pretrained.get("mean"),
                "std": pretrained.get("std")}
        out = {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}
        source = {"heads": "config.json model_args", "mean": "config.json", "std": "config.json"}
    else:
        return {}, {}
    out = {k: v for k, v in out.items() if v is not None}
    return out, {k: source[k] for k in out}


## --------------------------------------------------------------------------------------------------------
## The whole reading, for vit.load_vit.

def read_vit_checkpoint(path) -> tuple[dict, dict, str, str, dict]:
    """(tensors under vit.py's names, ViTConfig fields, LAYOUTS key, what messages call the file, {field: where it
    came from} for the fields not taken from the tensors or the layout's defaults) of a ViT .safetensors file in
    any LAYOUTS layout (transformers 4 or 5 names, head models' prefixes removed), with what the files beside it
    say (described); tensors of heads and other parts the backbone does not use are dropped. The head count's
    source is always in the last: a file, or the assumption (assumed_heads). Raises CheckpointError naming the
    file and what is wrong with it."""
    sd = _strip_hf_prefix(read_tensors(path))
    name = detect_layout(path, sd)
    layout = LAYOUTS[name]
    what = layout.what + (" (transformers 5 names)" if name.startswith("huggingface") and _is_v5(sd) else "")
    check_finite(path, {k: v for k, v in sd.items() if not k.startswith(layout.ignore)})
    refuse_variants(path, sd)
    try:
        sd = layout.rename(dict(sd))
        fields = config_from_tensors(sd, layout)
    except KeyError as e:
        raise CheckpointError(f"{path}: {what} checkpoint misses tensor {e.args[0]}") from None
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {what}: {message}") from None
    given, sources = described(path, name, fields)
    sources = {"heads": assumed_heads(fields["width"])[1]} | sources
    return {k: v for k, v in sd.items() if not k.startswith(layout.ignore)}, fields | given, name, what, sources
