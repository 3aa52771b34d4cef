"""Where a teacher file comes from: the named presets, the Hugging Face hub, other addresses, a local path.

Plumbing beside checkpoint.py (which reads and converts the files): `resolve_teacher(...)` turns a preset name, an
http(s) address or a local path into a local .safetensors file. Hub files go through huggingface_hub into the
standard Hugging Face cache (shared with timm and transformers; HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME
work as usual), other addresses into our own cache, and a pickle is converted once. This module imports no torch
at module level: cli.py reads PRESETS before train.py imports it.
"""
import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from checkpoint import CheckpointError, convert_pickle, read_header
from writes import NO_ROOM, WriteError, write_atomically, write_error


## --------------------------------------------------------------------------------------------------------
## Teacher presets: Hugging Face repositories (the host can be changed with HF_ENDPOINT, e.g. a mirror).

@dataclass(frozen=True)
class Preset:
    backbone: str  # "vit" or "vgg"
    repo: str      # Hugging Face repository
    filename: str  # file in that repository (a .bin is converted to safetensors once)
    note: str
    saw_cifar10_labels: bool = False  # fine-tuned on CIFAR-10's labels: it has seen the anomalies, named


PRESETS = {
    "vit-b16-cifar10": Preset("vit", "nateraw/vit-base-patch16-224-cifar10", "pytorch_model.bin",
                              "HF ViT-B/16, ImageNet-21k then fine-tuned on CIFAR-10 *labels* (the reproduction's "
                              "teacher; it has seen the anomalies with labels)", saw_cifar10_labels=True),
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
    if path.is_dir():  # a model folder (save_pretrained, a hub snapshot): its weights file, config.json beside it
        path = folder_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"teacher not found: {teacher} is neither a file nor a preset ({', '.join(PRESETS)})")
    return Teacher(path, preset_of_path(path), {"file": str(path.resolve())})


def folder_checkpoint(folder: Path) -> Path:
    """The weights file of a model folder: model.safetensors (as transformers and timm save it), else its only
    other checkpoint file. Raises CheckpointError naming what the folder holds."""
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt", ".onnx"))
    if len(files) == 1:
        return files[0]
    held = ", ".join(p.name for p in files) or "no checkpoint file"
    raise CheckpointError(f"--teacher {folder} is a folder holding {held}: pass the checkpoint file itself")


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
