"""Teacher checkpoint files: read a .safetensors file safely, fetch a named preset, convert a pickle.

What lives here is about *files*, not networks: vit.py and vgg.py decide what the tensors mean.

- `read_tensors(path)` opens a .safetensors file after checking that it is one (header, offsets, size), so a
  wrong or half-downloaded file is refused with one line instead of a decoder error.
- `check_state_dict(...)` compares the tensors a loader wants with the tensors a file has and refuses a
  partial load (missing keys, unexpected keys, wrong shapes) naming the first few offenders.
- `PRESETS` / `resolve_teacher(...)` turn a preset name, an http(s) address or a local path into a local
  .safetensors file, downloading on first use into a cache folder (addresses: shared/docs/checkpoints.md).
- `convert_pickle(src, dst)` turns a PyTorch pickle (.bin/.pth) into safetensors, tensors only.

Run `python checkpoint.py convert model.pth model.safetensors` to convert a file by hand.
"""
import hashlib
import json
import os
import struct
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A teacher/student file that cannot be used; the message says which file, what is wrong, what to do."""


## --------------------------------------------------------------------------------------------------------
## Reading a .safetensors file. Layout (safetensors README "Format"): 8 bytes little-endian u64 N, then N
## bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
## raw tensor bytes; offsets count from the first byte after the header.

MAX_HEADER = 100 * 1024 * 1024  # the reference reader refuses larger headers too


def _sniff(path: Path, head: bytes) -> str:
    """Name the kind of a file that is not safetensors, for the error message."""
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):  # zip / pickle
        out = path.with_name(path.stem + ("-converted" if path.suffix == ".safetensors" else "") + ".safetensors")
        return (f"{path} is a PyTorch pickle, not safetensors: convert it once with "
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


def read_tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a checked .safetensors file, on the CPU, floats as float32."""
    read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # the header looked fine but the library still refuses it
        raise CheckpointError(f"{path} could not be read as safetensors ({e}): download it again") from None
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


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


def write_atomically(path, write):
    """write(tmp) writes the file under a temporary name; it is flushed to disk and then renamed over `path`, so
    a crash or kill at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # and the rename itself (POSIX; elsewhere the OS does not let a folder be opened)
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_tensors(tensors: dict, path, metadata: dict | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def convert_pickle(src, dst):
    """Convert a PyTorch pickle (.bin/.pth) into safetensors. weights_only=True: tensors only, no code runs."""
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{src} could not be read as a PyTorch checkpoint ({type(e).__name__}): "
                              f"download it again") from None
    for key in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CheckpointError(f"{src} holds no tensors: is it a model checkpoint?")
    save_tensors(tensors, dst, metadata={"format": "pt", "converted_from": Path(src).name})


## --------------------------------------------------------------------------------------------------------
## Teacher presets. Addresses from shared/docs/checkpoints.md; the host can be changed with HF_ENDPOINT (as in
## huggingface_hub), which is also how the tests point it at a closed port.

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
    "vgg16": Preset("vgg", "timm/vgg16.tv_in1k", "model.safetensors",
                    "torchvision's ImageNet VGG16 weights (the paper's teacher), as published by timm"),
}
DEFAULT_TEACHER = {"vit": "vit-b16-cifar10", "vgg": "vgg16"}
LABEL_FREE_VIT = [name for name, p in PRESETS.items() if p.backbone == "vit" and name != "vit-b16-cifar10"]


def preset_url(name: str) -> str:
    p = PRESETS[name]
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{p.repo}/resolve/main/{p.filename}"


def default_cache() -> Path:
    return Path(os.environ.get("KDAD_CACHE", Path.home() / ".cache" / "kdad-vit"))


def download(url: str, dst: Path, check=None, timeout: float = 30.0):
    """Fetch url into dst through a temporary file, so an interrupted download never looks like a finished one;
    a short read or a failed check(tmp) (e.g. an error page instead of a model) keeps nothing."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {dst}")
    tty = sys.stderr.isatty()

    def fetch(tmp: Path):
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                done += len(block)
                if tty:
                    print(f"\r  {done / 2**20:.0f} / {total / 2**20:.0f} MiB", end="", file=sys.stderr)
        if tty:
            print(file=sys.stderr)
        if total and done != total:  # a dropped connection can end the read early without an error
            raise OSError(f"the connection closed after {done} of {total} bytes")
        if check:
            check(tmp)
    try:
        write_atomically(dst, fetch)
    except (urllib.error.URLError, OSError, CheckpointError) as e:
        dst.with_name(dst.name + ".tmp").unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(f"could not download {url} ({reason}); without network, download it elsewhere "
                              f"and pass the file with --teacher /path/to/model.safetensors") from None


def cache_name(url: str, name: str) -> str:
    """One cache file per address."""
    return f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:10]}.safetensors"


def resolve_teacher(teacher: str, cache_dir=None) -> tuple[Path, str, str | None]:
    """(a local .safetensors path, a short name, the preset it is or None) for a preset name, an http(s) address
    or a path. Presets and addresses are downloaded once into the cache; a damaged cached file is fetched again."""
    cache = Path(cache_dir) if cache_dir else default_cache()
    if teacher in PRESETS or teacher.startswith(("http://", "https://")):
        url = preset_url(teacher) if teacher in PRESETS else teacher
        preset = next((n for n in PRESETS if preset_url(n) == url), None)
        name = preset or Path(url.split("?")[0]).stem
        return fetch_into_cache(url, cache / cache_name(url, name)), name, preset
    path = Path(teacher).expanduser()
    if not path.is_file():
        raise CheckpointError(f"teacher not found: {teacher} is neither a file nor a preset ({', '.join(PRESETS)})")
    preset = next((n for n in PRESETS if path.name == cache_name(preset_url(n), n)), None)  # a cached preset
    return path, path.stem, preset


def fetch_into_cache(url: str, dst: Path) -> Path:
    if dst.is_file():
        try:
            read_header(dst)
            return dst
        except CheckpointError as e:
            print(f"the cached teacher is damaged ({e}); downloading it again")
            dst.unlink()
    if url.split("?")[0].endswith((".bin", ".pth", ".pt")):  # a pickle: fetched, converted once, removed
        raw = dst.with_suffix(".pickle")
        download(url, raw)
        convert_pickle(raw, dst)
        raw.unlink()
    else:
        download(url, dst, check=read_header)
    return dst


def main(argv=None):
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3 or args[0] != "convert":
        print("usage: python checkpoint.py convert IN.pth OUT.safetensors", file=sys.stderr)
        return 2
    try:
        convert_pickle(args[1], args[2])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
