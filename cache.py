"""The teacher-feature cache of the VGG recipes: with no augmentation the frozen teacher gives every training image
the same features in every epoch, so they are computed once and training reads them (train.fit).

Plumbing beside train.py: where the cache fits (the GPU, else pinned host memory, else nowhere: the teacher is then
recomputed every step) is decided here.
"""
import os

import torch

from cli import progress
from data import batches


def host_memory_available() -> int:
    """Bytes the OS could give us now (Linux MemAvailable, counting reclaimable cache), else a sysconf guess."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        names = getattr(os, "sysconf_names", {})
        if "SC_AVPHYS_PAGES" in names and "SC_PAGE_SIZE" in names:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return 0


def feature_cache(kdad, images, prep, amp, batch_size, device, precision):
    """Teacher features of the training taps for every training image, computed once; None if they do not fit.
    Stored in the dtype the teacher computes in (bf16 under bf16 autocast), so training on them is exact."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with amp():
        probe = kdad.teacher_features(prep(images[:1], prep.center(1)), kdad.taps.train_teacher)
    need = sum(f[0].numel() for f in probe) * dtype.itemsize * len(images)
    host = host_memory_available()
    if need < 0.5 * (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host):
        where, pin = device, False
    elif device.type == "cuda" and need < 0.5 * host:
        where, pin = torch.device("cpu"), True
    else:
        print(f"teacher-feature cache: {need / 2**30:.1f} GiB does not fit; recomputing the teacher every step")
        return None
    cache = [torch.empty((len(images), *f.shape[1:]), dtype=dtype, device=where, pin_memory=pin) for f in probe]
    print(f"teacher-feature cache: {need / 2**30:.2f} GiB of {str(dtype)[6:]} "
          + ("in pinned host memory (does not fit on the GPU)" if pin else f"on {where}"))
    order = torch.arange(len(images))
    n = (len(images) + batch_size - 1) // batch_size
    with progress(batches(images, order, prep.center(len(images)), batch_size, prep), n, "caching") as bar:
        for idx, x in bar:
            with amp():
                for c, f in zip(cache, kdad.teacher_features(x, kdad.taps.train_teacher), strict=True):
                    c[idx.to(c.device)] = f.to(c.device, dtype)
    return cache
