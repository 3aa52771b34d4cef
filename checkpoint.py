"""Teacher checkpoint files: read a .safetensors file safely, fetch a named preset, convert a pickle.

What lives here is about *files*, not networks: vit.py and vgg.py decide what the tensors mean.

- `read_tensors(path)` opens a .safetensors file after checking that it is one (header, offsets, size), so a
  wrong or half-downloaded file is refused with one line instead of a decoder error.
- `check_state_dict(...)` compares the tensors a loader wants with the tensors a file has and refuses a
  partial load (missing keys, unexpected keys, wrong shapes) naming the first few offenders.
- `PRESETS` / `resolve_teacher(...)` turn a preset name, an http(s) address or a local path into a local
  .safetensors file: hub files through huggingface_hub into the standard Hugging Face cache, other addresses
  into our own, pickles converted once.
- `convert_pickle(src, dst)` turns a PyTorch pickle (.bin/.pth) into safetensors, tensors only;
  `convert_onnx(src, dst)` does the same for a torch.onnx export of a Hugging Face ViT / DINOv2 backbone.

Run `python checkpoint.py convert model.pth model.safetensors` (or model.onnx) to convert a file by hand.
"""
import hashlib
import json
import os
import pickletools
import re
import struct
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from writes import NO_ROOM, WriteError, write_atomically, write_error

# torch (and safetensors.torch, which imports it) are imported inside the functions that use them: cli.py reads
# PRESETS from here before train.py imports torch, so that --help and a bad flag answer at once.


class CheckpointError(ValueError):
    """A teacher/student file that cannot be used; the message says which file, what is wrong, what to do."""


## --------------------------------------------------------------------------------------------------------
## Reading a .safetensors file. Layout (safetensors README "Format"): 8 bytes little-endian u64 N, then N
## bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
## raw tensor bytes; offsets count from the first byte after the header.

MAX_HEADER = 100 * 1024 * 1024  # the reference reader refuses larger headers too


def _sniff(path: Path, head: bytes) -> str:
    """Name the kind of a file that is not safetensors, for the error message. The converted file it suggests
    goes into the current folder (the original may lie where nothing should be written, e.g. site-packages)."""
    out = Path(path.stem + ("-converted" if path.suffix == ".safetensors" else "") + ".safetensors")
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):  # zip / pickle
        top = _pickled_class(path)
        if top and top not in ("collections.OrderedDict", "builtins.dict"):
            return (f"{path} is a pickled {top} object (a whole model), not a state dict: where it was made, save "
                    f"`torch.save(model.state_dict(), 'weights.pth')`, convert that with `python checkpoint.py "
                    f"convert weights.pth {out}` and pass the result")
        return (f"{path} is a PyTorch pickle, not safetensors: convert it once with "
                f"`python checkpoint.py convert {path} {out}` and pass that file")
    if path.suffix == ".onnx" or (head[:1] == b"\x08" and head[2:3] == b"\x12"):  # ModelProto: ir_version, producer
        return (f"{path} is an ONNX model, not safetensors: convert it once with "
                f"`python checkpoint.py convert {path} {out}` and pass that file")
    if head.lstrip()[:5].lower() in (b"<!doc", b"<html", b"<?xml", b"<head", b"<body"):
        return f"{path} is an HTML/XML page, not safetensors (a failed download?): download it again"
    return f"{path} is not a safetensors file (unreadable header): check the path or download it again"


def read_header(path) -> dict:
    """Parse and check the header of a .safetensors file; raises CheckpointError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is empty or truncated ({size} bytes): download it again")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            raise CheckpointError(_sniff(path, head + f.read(64)))
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise CheckpointError(_sniff(path, head)) from None
    data_size = size - 8 - n
    ends = [info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"]
    if ends and max(ends) > data_size:
        raise CheckpointError(f"{path} is truncated ({size} bytes, tensors need {8 + n + max(ends)}): "
                              f"download it again")
    return header


def read_tensors(path) -> dict:
    """{name: torch.Tensor} of a checked .safetensors file, on the CPU, floats as float32, wrapper prefixes
    removed."""
    from safetensors.torch import load_file
    read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # the header looked fine but the library still refuses it
        raise CheckpointError(f"{path} could not be read as safetensors ({e}): download it again") from None
    return strip_wrapper_prefix({k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()})


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DistributedDataParallel, torch.compile


def strip_wrapper_prefix(tensors: dict) -> dict:
    """The weights of a model saved while wrapped carry the wrapper's attribute in front of every name."""
    for p in WRAPPER_PREFIXES:
        if tensors and all(k.startswith(p) for k in tensors):
            return strip_wrapper_prefix({k.removeprefix(p): v for k, v in tensors.items()})
    return tensors


def read_metadata(path) -> dict:
    return read_header(path).get("__metadata__", {})


def _few(keys, n=4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(path, found: dict, expected: dict, what: str):
    """Refuse a partial load: `found` (renamed file tensors) must match `expected` (model.state_dict())."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    wrong = [f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
             for k in sorted(expected.keys() & found.keys()) if found[k].shape != expected[k].shape]
    if missing:
        raise CheckpointError(f"{path}: {what} checkpoint misses {len(missing)} tensors: {_few(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: {what} checkpoint has {len(unexpected)} unexpected tensors: "
                              f"{_few(unexpected)}")
    if wrong:
        raise CheckpointError(f"{path}: {what} checkpoint has tensors of the wrong shape: {_few(wrong, 3)}")


def check_finite(path, tensors: dict):
    """Refuse NaN/inf in the tensors that will be used (some files carry unused heads full of NaN)."""
    import torch
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} has non-finite values (NaN/inf) in {_few(bad)}: the file is damaged")


def sha256(path) -> str:
    """Digest of a file, recorded in a run's config.json so evaluate.py can tell if the teacher changed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(tensors: dict, path, metadata: dict | None = None):
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _check_paths(src, dst, overwrite: bool):
    if not Path(src).is_file():
        raise CheckpointError(f"file to convert not found: {src}")
    if Path(dst).exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists: remove it or choose another output name")


def _pickled_class(src) -> str | None:
    """The class of the top-level object in a torch.save zip, read from its pickle opcodes without running any
    of it; None when the top level is a plain dict or the file is not a zip."""
    try:
        with zipfile.ZipFile(src) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        for op, arg, _ in pickletools.genops(data):
            if op.name not in ("PROTO", "FRAME"):
                return arg.replace(" ", ".") if op.name == "GLOBAL" else None
    except (zipfile.BadZipFile, StopIteration, ValueError, OSError):
        return None
    return None


def convert_pickle(src, dst, overwrite=False):
    """Convert a PyTorch pickle (.bin/.pth) into safetensors. weights_only=True: tensors only, no code runs.
    Training checkpoints' {"state_dict": ...} / {"model": ...} nesting and DataParallel's "module." are removed."""
    import torch
    _check_paths(src, dst, overwrite)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        top = _pickled_class(src)
        if top and top not in ("collections.OrderedDict", "builtins.dict"):
            raise CheckpointError(f"{src} is a pickled {top} object (a whole model), not a state dict, and loading "
                                  f"it would run code: where it was made, save `torch.save(model.state_dict(), "
                                  f"'weights.pth')` and convert that") from None
        if found:
            raise CheckpointError(f"{src} holds Python objects besides tensors ({found.group(1)}), which are not "
                                  f"loaded without running code: where it was made, save `torch.save("
                                  f"model.state_dict(), 'weights.pth')` and convert that") from None
        raise CheckpointError(f"{src} could not be read as a PyTorch checkpoint ({type(e).__name__}): "
                              f"download it again") from None
    for key in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CheckpointError(f"{src} holds no tensors: is it a model checkpoint?")
    save_tensors(strip_wrapper_prefix(tensors), dst, metadata={"format": "pt", "converted_from": Path(src).name})
    return f"{len(tensors)} tensors"


## A torch.onnx export of a Hugging Face ViT / DINOv2 keeps the module paths as initializer names, except the
## Linear weights: each is folded into an anonymous, already transposed MatMul initializer, whose output an Add
## with the named bias takes next. The position table may be folded too: into a [1, 1, D] CLS part and a
## [1, N, D] patch part that the graph resizes at run time. Node order says nothing (torch.onnx emits key,
## value, query), so each weight is named after its bias.

def _onnx_graph(src):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError("converting an ONNX model needs the onnx package: pip install onnx") from None
    try:
        graph = onnx.load(str(src)).graph
    except Exception as e:
        raise CheckpointError(f"{src} could not be read as an ONNX model ({type(e).__name__})") from None
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return graph, {k: v for k, v in arrays.items() if v.dtype.kind == "f"}  # the int64 shape constants go


def _is_named(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][\w.]*", name) is not None  # a module path, not "onnx::MatMul_1966"


def onnx_backbone(src) -> tuple[dict, dict]:
    """({Hugging Face name: tensor} of the ViT / DINOv2 backbone in a torch.onnx export, {name: shape} of the
    float initializers left out: other modules (e.g. a task head) and anonymous tensors not recognised)."""
    import torch
    graph, arrays = _onnx_graph(src)
    marker = "embeddings.patch_embeddings.projection.weight"
    hits = [n for n in arrays if n.endswith(marker) and _is_named(n)]
    if len(hits) != 1:
        raise CheckpointError(f"{src} holds no Hugging Face ViT / DINOv2 backbone (no initializer named "
                              f"...{marker}): this converter reads torch.onnx exports of transformers' ViTModel, "
                              f"Dinov2Model and Dinov2WithRegistersModel, alone or inside a bigger model")
    prefix = hits[0].removesuffix(marker)  # e.g. "backbone." when the ViT is a submodule
    width = arrays[hits[0]].shape[0]
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out, used = {}, set()
    for node in graph.node:  # Linear weights: MatMul(x, W^T), then Add(bias, .) names the module
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w not in arrays or _is_named(w):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = [i for n in adds for i in n.input if i.endswith(".bias") and i in arrays]
        if len(bias) == 1:
            out[bias[0].removesuffix("bias") + "weight"] = torch.from_numpy(arrays[w].T.copy())
            used.add(w)
    out |= {k: torch.from_numpy(v.copy()) for k, v in arrays.items() if _is_named(k)}
    if prefix + "embeddings.position_embeddings" not in out:
        out[prefix + "embeddings.position_embeddings"] = _onnx_position_table(src, arrays, consumers, used, width)
    backbone = {k.removeprefix(prefix): v for k, v in out.items() if k.startswith(prefix)}
    left_out = {k: tuple(v.shape) for k, v in out.items() if not k.startswith(prefix)}
    left_out |= {k: v.shape for k, v in arrays.items() if k not in used and not _is_named(k) and v.ndim}
    return backbone, left_out


def _onnx_position_table(src, arrays, consumers, used, width):
    """Glue the folded [1, 1, D] CLS part (fed to a Concat) and [1, N, D] patch part (fed to the Reshape before
    the run-time resize) back into [1, 1 + N, D]."""
    import torch
    def part(rows, op):
        found = [k for k, v in arrays.items() if not _is_named(k) and k not in used and v.ndim == 3
                 and v.shape[0] == 1 and v.shape[2] == width and rows(v.shape[1])
                 and [n.op_type for n in consumers.get(k, [])] == [op]]
        return found[0] if len(found) == 1 else None
    cls, patches = part(lambda n: n == 1, "Concat"), part(lambda n: n > 1, "Reshape")
    if not (cls and patches):
        raise CheckpointError(f"{src}: the position table is neither a named initializer nor the two folded parts "
                              f"this converter knows (a [1, 1, {width}] CLS part and a [1, N, {width}] grid)")
    used |= {cls, patches}
    return torch.cat([torch.from_numpy(arrays[cls].copy()), torch.from_numpy(arrays[patches].copy())], dim=1)


def convert_onnx(src, dst, overwrite=False) -> str:
    """Write the Hugging Face backbone of a torch.onnx export (see onnx_backbone) as safetensors in Hugging Face
    names, which load_vit reads like any Hugging Face file; returns what was written and left out."""
    _check_paths(src, dst, overwrite)
    backbone, left_out = onnx_backbone(src)
    save_tensors(backbone, dst, metadata={"format": "pt", "converted_from": Path(src).name})
    groups = {}
    for k in left_out:
        head = k.split(".")[0] + ".*" if _is_named(k) else "unnamed"
        groups[head] = groups.get(head, 0) + 1
    return (f"{len(backbone)} backbone tensors in Hugging Face names; left out {len(left_out)} tensors that are not "
            f"part of it" + (f" ({', '.join(f'{g}: {n}' for g, n in groups.items())})" if groups else ""))


## --------------------------------------------------------------------------------------------------------
## Teacher presets: Hugging Face repositories (the host can be changed with HF_ENDPOINT, e.g. a mirror).

@dataclass(frozen=True)
class Preset:
    backbone: str  # "vit" or "vgg"
    repo: str      # Hugging Face repository
    filename: str  # file in that repository (a .bin is converted to safetensors once)
    note: str


PRESETS = {
    "vit-b16-cifar10": Preset("vit", "nateraw/vit-base-patch16-224-cifar10", "pytorch_model.bin",
                              "HF ViT-B/16, ImageNet-21k then fine-tuned on CIFAR-10 *labels* (the reproduction's "
                              "teacher; it has seen the anomalies with labels)"),
    "vit-b16-in21k": Preset("vit", "google/vit-base-patch16-224-in21k", "model.safetensors",
                            "HF ViT-B/16 pretrained on ImageNet-21k, no CIFAR-10 labels"),
    "dino-vits16": Preset("vit", "timm/vit_small_patch16_224.dino", "model.safetensors",
                          "DINO ViT-S/16, self-supervised on ImageNet, no labels"),
    "dino-vitb16": Preset("vit", "timm/vit_base_patch16_224.dino", "model.safetensors",
                          "DINO ViT-B/16, self-supervised on ImageNet, no labels"),
    "dinov2-vits14": Preset("vit", "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors",
                            "DINOv2 ViT-S/14 (LVD-142M, self-supervised, no labels), 518 px, run at --image-size"),
    "dinov2-vitb14": Preset("vit", "timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors",
                            "DINOv2 ViT-B/14 (LVD-142M, self-supervised, no labels), 518 px, run at --image-size"),
    # The same DINOv2 weights as transformers publishes them (Dinov2Model / Dinov2WithRegistersModel layout). At
    # another --image-size than 518 they run as transformers runs them (position table resized by plain bicubic;
    # antialiased bicubic for the with-registers models), which is not the network timm runs at that size.
    "dinov2-vits14-hf": Preset("vit", "facebook/dinov2-small", "model.safetensors",
                               "DINOv2 ViT-S/14 (LVD-142M, no labels) in transformers' layout, 518 px, run at "
                               "--image-size as transformers runs it"),
    "dinov2-vitb14-hf": Preset("vit", "facebook/dinov2-base", "model.safetensors",
                               "DINOv2 ViT-B/14 (LVD-142M, no labels) in transformers' layout, 518 px, run at "
                               "--image-size as transformers runs it"),
    "dinov2-reg-vits14-hf": Preset("vit", "facebook/dinov2-with-registers-small", "model.safetensors",
                                   "DINOv2 ViT-S/14 with 4 registers (no labels) in transformers' layout, 518 px"),
    "dinov2-reg-vitb14-hf": Preset("vit", "facebook/dinov2-with-registers-base", "model.safetensors",
                                   "DINOv2 ViT-B/14 with 4 registers (no labels) in transformers' layout, 518 px"),
    "vgg16": Preset("vgg", "timm/vgg16.tv_in1k", "model.safetensors",
                    "torchvision's ImageNet VGG16 weights (the paper's teacher), as published by timm"),
}
# the recipes' teachers: the reproduction's (label-leaking, see the README) and the paper's on CIFAR-10; on MVTec AD,
# whose defects no CIFAR-10 label says anything about, a self-supervised DINOv2 for the ViT
DEFAULT_TEACHER = {"cifar10": {"vit": "vit-b16-cifar10", "vgg": "vgg16"},
                   "mvtec": {"vit": "dinov2-vitb14", "vgg": "vgg16"}}
LABEL_FREE_VIT = [name for name, p in PRESETS.items() if p.backbone == "vit" and name != "vit-b16-cifar10"]


## --------------------------------------------------------------------------------------------------------
## Where a teacher file comes from: the Hugging Face hub through huggingface_hub (its standard cache, shared with
## timm and transformers; resumable downloads; HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME as users know them),
## another http(s) address (fetched once into our own cache), or a local file. A pickle is converted once.

@dataclass(frozen=True)
class Teacher:
    """A teacher file ready to read, and where it came from (config.json records `origin`)."""
    path: Path          # a local .safetensors file
    preset: str | None  # the preset it is, also when given by a path into a cache
    origin: dict        # {"repo", "filename", "revision", "commit"} from the hub, {"url"}, or {"file"}


def default_cache() -> Path:
    """Our own cache (pickles converted to safetensors, files from other addresses): $KDAD_CACHE or
    ~/.cache/kdad-vit. Hub files stay in the Hugging Face cache."""
    return Path(os.environ.get("KDAD_CACHE", Path.home() / ".cache" / "kdad-vit"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def resolve_teacher(teacher: str, cache_dir=None) -> Teacher:
    """The Teacher for a preset name, an http(s) address or a path. cache_dir (--cache-dir) replaces both the
    Hugging Face cache and ours. Raises CheckpointError with one line for anything that cannot be fetched."""
    if teacher in PRESETS:
        p = PRESETS[teacher]
        return hub_teacher(p.repo, p.filename, "main", cache_dir, teacher)
    if teacher.startswith(("http://", "https://")):
        hub = parse_hub_url(teacher)
        if hub:
            return hub_teacher(*hub, cache_dir, preset_of_repo(hub[0], hub[1]))
        return Teacher(fetch_into_cache(teacher, (Path(cache_dir) if cache_dir else default_cache()) /
                                        cache_name(teacher)), None, {"url": teacher})
    path = Path(teacher).expanduser()
    if not path.is_file():
        raise CheckpointError(f"teacher not found: {teacher} is neither a file nor a preset ({', '.join(PRESETS)})")
    return Teacher(path, preset_of_path(path), {"file": str(path.resolve())})


def parse_hub_url(url: str) -> tuple[str, str, str] | None:
    """(repo, filename, revision) of a <endpoint>/<org>/<repo>/resolve/<revision>/<file> address, else None."""
    from urllib.parse import unquote
    host = hub_endpoint()
    if not url.startswith(host + "/") or "/resolve/" not in url:
        return None
    repo, rest = url[len(host) + 1:].split("?")[0].split("/resolve/", 1)
    revision, _, filename = rest.partition("/")
    return (repo, unquote(filename), unquote(revision)) if repo.count("/") == 1 and filename else None


def preset_of_repo(repo: str, filename: str) -> str | None:
    return next((n for n, p in PRESETS.items() if (p.repo, p.filename) == (repo, filename)), None)


def preset_of_path(path: Path) -> str | None:
    """The preset a local file is, when it lies in a cache: models--<org>--<repo>/snapshots/<commit>/<file> in
    the Hugging Face cache, or our converted <org>--<repo>-<commit>-<file>.safetensors."""
    for name, p in PRESETS.items():
        slug = p.repo.replace("/", "--")
        in_hub = path.name == p.filename and f"models--{slug}" in path.parts
        if in_hub or (path.name.startswith(slug + "-") and path.name.endswith(f"-{p.filename}.safetensors")):
            return name
    return None


def hub_teacher(repo: str, filename: str, revision: str, cache_dir, preset: str | None) -> Teacher:
    """A file of a hub repository as a local safetensors file. A cached file is used as it is (offline too); a
    damaged one (a failed or foreign download) is fetched once more, then refused; a pickle is converted once,
    into our cache, named after the repository and the commit it came from."""
    path = hub_download(repo, filename, revision, cache_dir)
    commit = path.parent.name if path.parent.parent.name == "snapshots" else None
    origin = {"repo": repo, "filename": filename, "revision": revision, "commit": commit}
    if filename.endswith((".bin", ".pth", ".pt")):
        converted = (Path(cache_dir) if cache_dir else default_cache()) / \
            f"{repo.replace('/', '--')}-{(commit or 'unknown')[:12]}-{filename}.safetensors"
        if not converted.is_file():
            converted.parent.mkdir(parents=True, exist_ok=True)
            print(f"converting {filename} of {repo} to safetensors, once: {converted}")
            convert_pickle(path, converted, overwrite=True)
        return Teacher(converted, preset, origin)
    try:
        read_header(path)
    except CheckpointError as e:
        print(f"note: the cached {repo}/{filename} is damaged ({e}); downloading it again")
        forget(path)
        path = hub_download(repo, filename, revision, cache_dir, force=True)
        try:
            read_header(path)
        except CheckpointError as e:
            forget(path)  # nothing damaged stays in the cache
            raise CheckpointError(f"{filename} of {repo} from {hub_endpoint()} is no safetensors file, downloaded "
                                  f"twice ({e}); a proxy or login page in the way? Download it by hand and pass it "
                                  f"with --teacher FILE") from None
    return Teacher(path, preset, origin)


def hub_download(repo: str, filename: str, revision: str, cache_dir, force=False) -> Path:
    """huggingface_hub.hf_hub_download, with its errors said in one line and its retry warnings kept quiet."""
    import logging

    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    where = f"{filename} of {repo} (revision {revision}) from {hub_endpoint()}"
    advice = "see 'Without network' in the README, or pass a local file with --teacher"
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir, force_download=force,
                                    endpoint=os.environ.get("HF_ENDPOINT")))
    except GatedRepoError:
        raise CheckpointError(f"{repo} is gated: accept its terms on its hub page, then set HF_TOKEN (or run "
                              f"`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no repository {repo} at {hub_endpoint()} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo} has no revision {revision}") from None
    except LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "no connection"
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        found = cached_snapshots(cache, repo, filename)
        if len(found) == 1:  # offline, huggingface_hub finds a snapshot only through refs/<revision>
            print(f"note: {why}, and the Hugging Face cache has no refs/{revision} for {repo} (copied without it?): "
                  f"using its only snapshot that holds {filename}, {found[0].parent.name}", file=sys.stderr)
            return found[0]
        if found:
            commits = ", ".join(f.parent.name[:12] for f in found)
            raise CheckpointError(f"could not download {where}: {why}; the Hugging Face cache ({cache}) holds "
                                  f"{filename} in {len(found)} snapshots of {repo} ({commits}) but no refs/{revision} "
                                  f"says which is {revision}: pass one with --teacher {found[0]}") from None
        raise not_cached(repo, filename, revision, cache_dir) from None
    except EntryNotFoundError:
        raise CheckpointError(f"{repo} has no file {filename} at revision {revision}") from None
    except (HfHubHTTPError, OSError, Exception) as e:  # also the HTTP client's own errors (a dropped connection)
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            raise write_error(e.filename or Path(cache_dir or constants.HF_HUB_CACHE) / filename,
                              e.strerror) from None  # the cache's disk, not the network
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"could not download {where} ({reason}); {advice}") from None
    finally:
        hf_logger.setLevel(level)


def cached_snapshots(cache: Path, repo: str, filename: str) -> list[Path]:
    """The copies of a repository's file in a Hugging Face cache: <cache>/models--<org>--<repo>/snapshots/<commit>/
    <filename>, whatever refs/ says (or lacks)."""
    snapshots = Path(cache) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return sorted(f for f in snapshots.glob(f"*/{filename}") if f.is_file())


def not_cached(repo: str, filename: str, revision: str, cache_dir) -> CheckpointError:
    from huggingface_hub import constants
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "no connection"
    return CheckpointError(f"could not download {filename} of {repo} (revision {revision}) from {hub_endpoint()}: "
                           f"{why}, and it is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}); "
                           f"see 'Without network' in the README, or pass a local file with --teacher")


def check_offline(teacher: str, cache_dir=None):
    """In offline mode (HF_HUB_OFFLINE), a preset or hub address whose file is not in the Hugging Face cache:
    CheckpointError (not_cached's line). Reads the cache only and imports no torch, so train.py answers before its
    slow imports; anything else (a snapshot without refs/ too) is left to resolve_teacher."""
    from huggingface_hub import constants, try_to_load_from_cache
    hub = (PRESETS[teacher].repo, PRESETS[teacher].filename, "main") if teacher in PRESETS else \
        parse_hub_url(teacher) if teacher.startswith(("http://", "https://")) else None
    if constants.HF_HUB_OFFLINE and hub:
        repo, filename, revision = hub
        cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
        if not isinstance(cached, str) and not cached_snapshots(cache_dir or constants.HF_HUB_CACHE, repo, filename):
            raise not_cached(repo, filename, revision, cache_dir)


def forget(path: Path):
    """Remove a file from the Hugging Face cache: its snapshot entry and the blob it points to."""
    blob = Path(os.path.realpath(path))
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


def cache_name(url: str) -> str:
    """One cache file per address: the file's name and a digest of the whole address."""
    stem = Path(url.split("?")[0]).stem or "teacher"
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:10]}.safetensors"


def download(url: str, dst: Path, check=None, timeout: float = 30.0):
    """Fetch an address that is not on the hub into dst through a temporary file, so an interrupted download never
    looks like a finished one; a short read or a failed check(tmp) (e.g. an error page instead of a model) keeps
    nothing. (Hub files go through huggingface_hub instead.)"""
    print(f"downloading {url} -> {dst}")
    created = not dst.parent.exists()
    dst.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: Path):
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                done += len(block)
        if total and done != total:  # a dropped connection can end the read early without an error
            raise ConnectionError(f"the connection closed after {done} of {total} bytes")
        if check:
            check(tmp)
    try:
        write_atomically(dst, fetch)
    except (urllib.error.URLError, OSError, CheckpointError) as e:
        if created and not any(dst.parent.iterdir()):
            dst.parent.rmdir()  # a failed first download leaves no empty cache folder behind
        if isinstance(e, WriteError):
            raise
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(f"could not download {url} ({reason}); see 'Without network' in the README, or "
                              f"download it elsewhere and pass the file with --teacher FILE") from None


def fetch_into_cache(url: str, dst: Path) -> Path:
    """An address that is not on the hub, downloaded once into dst (a pickle converted on the way)."""
    if dst.is_file():
        try:
            read_header(dst)
            return dst
        except CheckpointError as e:
            print(f"note: the cached teacher is damaged ({e}); downloading it again")
            dst.unlink()
    if url.split("?")[0].endswith((".bin", ".pth", ".pt")):  # a pickle: fetched, converted once, removed
        raw = dst.with_suffix(".pickle")
        download(url, raw)
        try:
            convert_pickle(raw, dst, overwrite=True)
        finally:
            raw.unlink()
    else:
        download(url, dst, check=read_header)
    return dst


def main(argv=None):
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3 or args[0] != "convert":
        print("usage: python checkpoint.py convert IN.(pth|bin|onnx) OUT.safetensors", file=sys.stderr)
        return 2
    src, dst = args[1:]
    try:
        done = (convert_onnx if src.endswith(".onnx") else convert_pickle)(src, dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
