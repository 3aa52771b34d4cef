"""The teacher-feature cache of the recipes without augmentation (VGG; the ViT on MVTec AD): the frozen teacher then
gives every image the same features in every epoch, so they are computed once and training (and the per-epoch
validation loss) reads them (train.fit).

Plumbing beside train.py: where the cache fits is decided here, by a pure function of the sizes (placement):
on the training device when it takes under half of the device's free memory; else, for a GPU, in host memory
(under half of what this process may still use: MemAvailable, capped by a cgroup v2/v1 memory limit), read through
a pinned staging buffer per tap; else nowhere, and the teacher is recomputed every step.

    cache = feature_cache(kdad, images, prep, amp, batch_size=256, device=device, train_batch=64)
    teacher_feats = cache.features(idx)     # idx: image indices on the device -> one tensor per training tap
"""
import os
from pathlib import Path

import torch

from cli import note, progress
from data import batches

CGROUP = Path("/sys/fs/cgroup")


## --------------------------------------------------------------------------------------------------------
## How much memory there is: pure functions of numbers read from the system, so they can be tested with fake ones.

def meminfo_available(text: str) -> int | None:
    """Bytes of MemAvailable in the text of /proc/meminfo (free memory plus reclaimable cache), or None."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def cgroup_room(limit: str | None, usage: str | None) -> int | None:
    """Bytes a memory cgroup still allows, from its limit and usage files' text (v2 memory.max / memory.current,
    v1 memory.limit_in_bytes / memory.usage_in_bytes); None without a limit ('max', or v1's 'no limit' value of
    about 2^63 rounded down to a page)."""
    if limit is None or usage is None or limit.strip() == "max":
        return None
    cap = int(limit)
    if cap >= 2**62:  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit value
        return None
    return max(0, cap - int(usage))


def host_room(available: int | None, cgroup: int | None) -> int:
    """Bytes of host memory this process can still take: the smaller of MemAvailable and its cgroup's room (a
    container sees the whole machine's MemAvailable, but is killed at its own limit)."""
    known = [b for b in (available, cgroup) if b is not None]
    return min(known) if known else 0


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def host_memory_available() -> int:
    """host_room for this process: /proc/meminfo and the cgroup (v2, else v1) this process runs in."""
    available = meminfo_available(read(Path("/proc/meminfo")) or "")
    if available is None:  # not Linux
        names = getattr(os, "sysconf_names", {})
        if "SC_AVPHYS_PAGES" in names and "SC_PAGE_SIZE" in names:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = cgroup_room(read(CGROUP / "memory.max"), read(CGROUP / "memory.current"))
    if room is None:
        room = cgroup_room(read(CGROUP / "memory" / "memory.limit_in_bytes"),
                           read(CGROUP / "memory" / "memory.usage_in_bytes"))
    return host_room(available, room)


def pinned_bytes(n: int) -> int:
    """What PyTorch's pinned-memory allocator takes for a request of n bytes: it rounds each block up to a power of
    two (CachingHostAllocator, with the default pinned_max_round_threshold)."""
    return 1 << max(0, n - 1).bit_length()


def placement(need: int, staging: list[int], device_free: int, host_free: int, cuda: bool) -> str | None:
    """Where a cache of `need` bytes goes: 'device' (the GPU, or the CPU when training on the CPU), 'host' (host
    memory for a GPU run, read through pinned staging buffers of `staging` bytes each, rounded as pinned memory
    is), or None (recompute the teacher). Each may take at most half of its free memory: the rest is for training,
    scoring and everything else on the machine."""
    if need < 0.5 * (device_free if cuda else host_free):
        return "device"
    if cuda and need + sum(pinned_bytes(s) for s in staging) < 0.5 * host_free:
        return "host"
    return None


## --------------------------------------------------------------------------------------------------------
## The cache.

class FeatureCache:
    """Teacher features of N images at the training taps: `tensors` (one (N, ...) tensor per tap) on `device`, or
    in host memory for a GPU `device`. features(idx) returns the rows of images idx (on the device) there."""

    def __init__(self, tensors: list, device, train_batch: int):
        self.tensors, self.device = tensors, device
        self.on_host = tensors[0].device != device
        # host memory -> GPU: gathered into pinned buffers, whose copies to the GPU need not wait for the host
        self.staging = [staging_buffer((train_batch, *t.shape[1:]), t.dtype) for t in tensors] if self.on_host else None

    def features(self, idx: torch.Tensor) -> list:
        """The cached features of images idx (B,) long, on the training device, one tensor per training tap."""
        if not self.on_host:
            return [t[idx] for t in self.tensors]
        i = idx.cpu()  # the host fallback's one wait per step: it also frees the staging buffers of the last one
        out = []
        for t, buf in zip(self.tensors, self.staging, strict=True):
            part = buf[:len(i)]
            torch.index_select(t, 0, i, out=part)
            out.append(part.to(self.device, non_blocking=True))
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def staging_buffer(shape, dtype) -> torch.Tensor:
    """A pinned host buffer; an ordinary one, with a note, where pinning fails (a locked-memory limit)."""
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    except RuntimeError as e:
        note(f"could not pin host memory for the feature cache ({str(e).splitlines()[0][:80]}): its copies to the "
             f"GPU wait for the host")
        return torch.empty(shape, dtype=dtype)


def feature_cache(kdad, images, prep, amp, batch_size: int, device, train_batch: int, what="training"):
    """Teacher features of the training taps for every image of `images` (uint8 (N, 3, h, w) on the device),
    computed once at `batch_size` images per pass; a FeatureCache, or None where it does not fit (said in one
    line). Each tap is stored in the dtype the teacher computes it in under `amp`: VGG16's pooled maps in bf16/fp16
    under bf16/fp16 autocast, the ViT's hidden states in fp32 (its residual stream stays fp32 under autocast).
    So training on the cache computes what recomputing would: bitwise on the CPU, where a teacher pass gives the
    same features at any batch size; on a GPU, the batch size can change the kernels cuDNN/cuBLAS pick, so equal to
    within rounding. An out-of-memory error while filling a GPU cache moves it to host memory, then gives up."""
    with amp():
        probe = kdad.teacher_features(prep(images[:1], prep.center(1)), kdad.taps.train_teacher)
    per_image = [f[0].numel() * f.element_size() for f in probe]
    need = sum(per_image) * len(images)
    cuda = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if cuda else 0
    where = placement(need, [b * train_batch for b in per_image], free, host_memory_available(), cuda)
    label = f"teacher-feature cache ({what} images)"
    while where is not None:
        try:
            return fill(kdad, images, prep, amp, batch_size, device, train_batch, probe, where, label)
        except torch.OutOfMemoryError:
            if where != "device" or not cuda:
                raise
            where = placement(need, [b * train_batch for b in per_image], 0, host_memory_available(), cuda)
            note(f"{label}: out of GPU memory while filling it; " + ("moving it to host memory" if where else
                                                                     "recomputing the teacher every step instead"))
            if where is None:
                return None
    print(f"{label}: {need / 2**30:.1f} GiB does not fit; recomputing the teacher every step")
    return None


def fill(kdad, images, prep, amp, batch_size, device, train_batch, probe, where, label) -> FeatureCache:
    on = device if where == "device" else torch.device("cpu")
    tensors = [torch.empty((len(images), *f.shape[1:]), dtype=f.dtype, device=on) for f in probe]
    cache = FeatureCache(tensors, device, train_batch)
    dtypes = sorted({str(f.dtype)[6:] for f in probe})
    print(f"{label}: {cache.nbytes / 2**30:.2f} GiB of {'/'.join(dtypes)} "
          + ("in host memory (does not fit on the GPU; one wait per training step)" if cache.on_host else f"on {on}"))
    order = torch.arange(len(images), device=images.device)
    n = (len(images) + batch_size - 1) // batch_size
    with progress(batches(images, order, prep.center(len(images)).to(images.device), batch_size, prep), n,
                  "caching") as bar:
        for idx, x in bar:
            with amp():
                rows = idx.to(on)  # on the host: one copy per batch, once per run
                for t, f in zip(tensors, kdad.teacher_features(x, kdad.taps.train_teacher), strict=True):
                    t[rows] = f.to(on)
    return cache
