"""Files written whole or not at all, and one line when the disk says no.

Plumbing for every file the project writes (run records, students, tables, pictures, converted and downloaded
teachers): `write_atomically` writes under a temporary name and renames it into place, so a crash, a kill or a full
disk at any moment leaves the previous version or the new one, never half of one and no `*.tmp`; a write the OS
refuses (a full disk, a quota, a read-only folder) becomes a WriteError whose message says what, where, why and the
free space there.

    write_atomically(run / "state.pt", lambda tmp: torch.save(state, tmp))   # WriteError on a full disk
"""
import contextlib
import errno
import gc
import os
import re
import shutil
import urllib.error
from pathlib import Path


WRITTEN = []  # every file this process has written (so a Ctrl-C can say whether anything was)


class WriteError(OSError):
    """A file could not be written (a full disk, a quota, a read-only or forbidden folder): str(e) is one line
    saying which file, why, and the free space where it was going."""


# what the file system answers only a write (no room, a quota, a read-only file system, a file too large); EACCES and
# EPERM are not among them, as a read gets them too: they count as a write failure only where a write failed
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def size_text(n: float) -> str:
    """'41.9 MB', '512 bytes' (decimal units, as df -H and file managers show them)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def free_space(folder) -> str:
    """'1.3 GB free' on the file system of `folder` (its nearest existing parent), or 'free space unknown'."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{size_text(shutil.disk_usage(folder).free)} free"
    except OSError:
        return "free space unknown"


def write_failure(e: BaseException) -> str | None:
    """Why an OS-level write failed, in words ('No space left on device'), or None for any other error. torch.save
    raises RuntimeError ('[enforce fail at inline_container.cc:672] . unexpected pos ...', or 'PytorchStreamWriter
    failed writing file ...') and safetensors a SafetensorError ('... I/O error: No space left on device (os error
    28)') where the OS said ENOSPC, EDQUOT, EROFS or EACCES."""
    if isinstance(e, WriteError):
        return None  # already said
    if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return None  # the network, not the disk (a download writes as it reads)
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    text = str(e)
    if type(e).__name__ == "SafetensorError" and ("I/O error" in text or "os error" in text):
        code = re.search(r"os error (\d+)", text)
        return os.strerror(int(code.group(1))) if code else text.split("I/O error:")[-1].strip()
    if isinstance(e, RuntimeError) and any(m in text for m in ("inline_container", "PytorchStreamWriter",
                                                              "file write failed")):
        # torch's zip writer reports a short write by position only ('unexpected pos'): the OS's reason is lost
        return "torch.save could not write the whole file, most likely as the disk is full"
    return None


def write_error(path, reason: str, written: int | None = None) -> WriteError:
    """The one line for a file that could not be written: what, where, why, how much of it had been written
    before it failed (removed since), and the free space there."""
    path = Path(path)
    partial = f"; it stopped after {size_text(written)} and was removed" if written else ""
    return WriteError(f"could not write {path.name} in {path.parent} ({reason}{partial}; "
                      f"{free_space(path.parent)} there now): make room or choose another folder, then run the "
                      f"command again; files saved before are intact")


def os_error_line(e: OSError) -> str:
    """One line for an OSError that reached the top of a command (a folder that could not be made, a file that
    could not be read): a write the file system refused says the free space too."""
    if isinstance(e, WriteError):
        return str(e)
    if e.errno in NO_ROOM and e.filename:
        return str(write_error(e.filename, e.strerror))
    return f"{e} (check the path, its permissions and the free space)"


def write_atomically(path, write):
    """write(tmp) writes the file under a temporary name; it is flushed to disk and then renamed over `path`, so
    a crash or kill at any moment leaves either the old file or the new one, never half of one. Whatever stops it
    (a full disk, Ctrl-C) removes the temporary file; an OS-level write failure (OSError, or torch.save's and
    safetensors' own errors for one) is raised as WriteError with one line (write_error)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what open() gives a new file; safetensors' writer makes its files 0600
        os.replace(tmp, path)
        WRITTEN.append(path)
        reason = None
    except BaseException as e:
        written = None
        with contextlib.suppress(OSError):
            written = tmp.stat().st_size
        with contextlib.suppress(OSError):  # half a file would keep the disk full for the retry
            tmp.unlink(missing_ok=True)
        reason = write_failure(e)
        if reason is None:
            raise
    if reason is not None:  # out of the except block, so the failed writer can be collected and its space freed
        gc.collect()
        raise write_error(path, reason, written)
    try:  # and the rename itself (POSIX; elsewhere the OS does not let a folder be opened)
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
