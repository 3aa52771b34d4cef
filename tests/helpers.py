"""Reference models with random weights, written to .safetensors in each library's key layout.

Nothing can be downloaded where the tests run, so every checkpoint layout this project reads (docs/teachers.md,
layouts.py) is built here from the reference library's own module (torchvision, timm, transformers), in the key
names that library publishes its files with.
"""
import os
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

# CIFAR-10 as JPEGs in train/<class>/ and test/<class>/, for the tests on real images (they skip without it):
# $KDAD_CIFAR10_JPEG, else shared/data/cifar10-jpeg beside the clone (where the build machines keep it)
CIFAR10_JPEG = Path(os.environ.get("KDAD_CIFAR10_JPEG")
                    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg")

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


## Hugging Face transformers models. transformers 5 names its modules q_proj / o_proj / mlp.fc1 (and ViT's blocks
## `layers.N`); the files on the hub carry the transformers 4 names, which transformers 5 renames when it loads them.
HF_TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
HF_TO_4 = [(r"\.attention\.q_proj\.", ".attention.attention.query."),
           (r"\.attention\.k_proj\.", ".attention.attention.key."),
           (r"\.attention\.v_proj\.", ".attention.attention.value."),
           (r"\.attention\.o_proj\.", ".attention.output.dense.")]
HF_VIT_TO_4 = [(r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
               (r"\.mlp\.fc2\.", ".output.dense.")]


def hf_model(arch: str, seed=0, **kw):
    """A small random transformers model, e.g. "ViTModel", "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel" (4 registers), 32 px, patch 8, width 128, 2 blocks of 2 heads. Needs transformers 5
    (the test skips without it): its state_dict() has the new names, hf_names_4 makes the old ones."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__}: these tests need 5 or later (the module names changed)")
    family = re.match(r"(ViT|Dinov2WithRegisters|Dinov2)", arch).group(1)
    extra = {"ViT": dict(intermediate_size=256), "Dinov2": dict(mlp_ratio=2),
             "Dinov2WithRegisters": dict(mlp_ratio=2, num_register_tokens=4)}[family]
    config = getattr(transformers, family + "Config")(**(HF_TINY | extra | kw))
    return randomize(getattr(transformers, arch)(config), seed)


def hf_names_4(sd: dict) -> dict:
    """A transformers 5 state_dict in the transformers 4 names of the files on the hub (the inverse of
    transformers' conversion_mapping.py for ViT, Dinov2 and Dinov2WithRegisters)."""
    vit = any(re.search(r"(^|\.)layers\.\d+\.", k) for k in sd)
    out = {}
    for k, v in sd.items():
        for pattern, repl in HF_TO_4 + (HF_VIT_TO_4 if vit else []):
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def hf_from_files(model, sd: dict, folder):
    """transformers' own reading of a state dict saved beside the model's config.json (from_pretrained), which
    must take every tensor: the reference for files with transformers 4 names."""
    folder.mkdir(exist_ok=True)
    save(sd, folder / "model.safetensors")
    model.config.save_pretrained(folder)
    loaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return loaded.eval()


def hf_hidden_states(model, x) -> list[torch.Tensor]:
    """transformers' hidden_states (ViT told to interpolate its position table, as Dinov2 always does), checked
    to be all before the final LayerNorm (the project's convention; some versions tied the last one to it)."""
    base = model.base_model  # the backbone of a head model (model.vit, model.dinov2 ...)
    kw = {"interpolate_pos_encoding": True} if type(base).__name__ == "ViTModel" else {}
    with torch.no_grad():
        out = base(pixel_values=x, output_hidden_states=True, **kw)
        assert torch.allclose(base.layernorm(out.hidden_states[-1]), out.last_hidden_state, atol=1e-5)
    return list(out.hidden_states)


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


class FakeHub:
    """A stand-in for the Hugging Face hub on 127.0.0.1: serves root/<org>/<repo>/resolve/<revision>/<file> with the
    headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length). mode "half" announces the whole file and
    sends half of it (a dropped connection). `gets` counts the file downloads."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, root):
        import hashlib
        import http.server
        import threading
        self.root, self.mode, self.gets = Path(root), "whole", 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def head(self):
                path = hub.root / self.path.split("?")[0].lstrip("/")
                if not path.is_file():  # the hub says which: no such repository, or no such file in it
                    repo = hub.root / "/".join(self.path.lstrip("/").split("/")[:2])
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound" if repo.is_dir() else "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return data

            def do_HEAD(self):
                self.head()

            def do_GET(self):
                data = self.head()
                if data is not None:
                    hub.gets += 1
                    self.wfile.write(data[: len(data) // 2] if hub.mode == "half" else data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def put(self, repo: str, filename: str, data: bytes):
        path = self.root / repo / "resolve" / "main" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def close(self):
        self.server.shutdown()
        self.server.server_close()
