"""Teacher checkpoint files: read a .safetensors file safely, convert a pickle or an ONNX export.

What lives here is about *files*, not networks: vit.py and vgg.py decide what the tensors mean.

- `read_tensors(path)` opens a .safetensors file after checking that it is one (header, offsets, size), so a
  wrong or half-downloaded file is refused with one line instead of a decoder error.
- `check_state_dict(...)` compares the tensors a loader wants with the tensors a file has and refuses a
  partial load (missing keys, unexpected keys, wrong shapes) naming the first few offenders.
- `convert_pickle(src, dst)` turns a PyTorch pickle (.bin/.pth) into safetensors, tensors only;
  `convert_onnx(src, dst)` does the same for a torch.onnx export of a Hugging Face ViT / DINOv2 backbone.

Run `python checkpoint.py convert model.pth model.safetensors` (or model.onnx) to convert a file by hand.
"""
import hashlib
import json
import pickletools
import re
import struct
import sys
import zipfile
from pathlib import Path

from writes import write_atomically

# torch (and safetensors.torch, which imports it) are imported inside the functions that use them: hub.py builds
# on this module, and cli.py reads hub.PRESETS before train.py imports torch, so that --help answers at once.


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
