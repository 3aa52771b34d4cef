"""Image folders read as a person sees them, torchvision's CIFAR-10, and which class --cls names.

Plumbing beside data.py (the protocol): the sources here offer what data.one_class_data needs (see data.py's
"Sources" comment) and everything else stays here:
- root/train/<class>/ and root/test/<class>/ hold the images; files in subfolders of a class folder belong to that
  class (as in torchvision's ImageFolder). Hidden entries, loose files and folders without images are not classes:
  they are left out and named once.
- The classes that can be chosen with --cls are the folders of train/ that hold images, in natural order (2 before
  10). When all ten CIFAR-10 names are among them, 0-9 keep CIFAR-10's torchvision order (3 is cat) and the other
  folders follow. Folders only in test/ (test/<defect> in the usual anomaly-detection layout) are anomalous only.
- Every image is decoded to the 8-bit RGB picture an image viewer shows (images.read_image), or left out and named
  with the reason.

    source = open_source("path/to/cifar10-jpeg", image_size=224)   # or None: torchvision's CIFAR-10
    label = class_index(source, "cat")                              # 3
"""
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli import counted, named, note
from data import CIFAR10_CLASSES, CROP_PCT, DataError, resize_size
from images import IMAGE_EXTENSIONS, UnreadableImage, read_image, square
from writes import NO_ROOM, write_error


class Source:
    """What every source shares: --cls resolution (class_index below)."""

    def class_index(self, cls) -> int:
        return class_index(self, cls)


## --------------------------------------------------------------------------------------------------------
## Which entries of train/ and test/ are classes: folders holding images. Everything else is named, never counted.

def natural_key(name: str):
    """Sort names as a file manager shows them: numbers as numbers (2 before 10), case ignored, then exact."""
    parts = re.split(r"([0-9]+)", name)
    return tuple((0, int(p), "") if p[:1].isdigit() else (1, 0, p.casefold()) for p in parts if p), name


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (.DS_Store, .ipynb_checkpoints, ._name AppleDouble files) and macOS archive
    metadata (__MACOSX): never shown by a file manager, never part of a class."""
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class SplitScan:
    """What one split folder holds: class folder -> its image files, and every entry left out, with why."""
    folders: dict = field(default_factory=dict)      # name -> list[Path] of image files (natural order)
    not_classes: list = field(default_factory=list)  # (Path, reason): entries of train/ or test/ that are no class
    not_images: list = field(default_factory=list)   # (Path, reason): files in class folders that are no image
    nested: dict = field(default_factory=dict)       # name -> number of its images that lie in subfolders


def scan_split(folder: Path) -> SplitScan:
    scan = SplitScan()
    for entry in listing(folder):
        path = Path(entry.path)
        if is_hidden(entry.name):
            scan.not_classes.append((path, "hidden"))
        elif entry.is_dir():
            images, others = [], []
            walk(path, images, others, {path.resolve()})
            if images:
                scan.folders[entry.name] = images
                scan.not_images += others
                inner = sum(f.parent != path for f in images)
                if inner:
                    scan.nested[entry.name] = inner
            else:
                scan.not_classes.append((path, f"a folder with no images ({len(others)} other entries)"
                                         if others else "an empty folder"))
        elif entry.is_file():
            scan.not_classes.append((path, f"a file directly in {folder.name}/, not in a class folder"))
        else:
            scan.not_classes.append((path, "neither a file nor a folder (a broken link?)"))
    return scan


def listing(folder: Path) -> list:
    """The entries of a folder (os.DirEntry: their kind comes with the listing), in natural order."""
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda e: natural_key(e.name))


def walk(folder: Path, images: list, others: list, seen: set):
    """Image files under `folder` (subfolders and links included, except a link back up) into `images`, the rest into
    `others` with the reason, both in natural order."""
    try:
        entries = listing(folder)
    except OSError as e:
        others.append((folder, f"cannot be listed ({e.strerror or e})"))
        return
    for entry in entries:
        path = Path(entry.path)
        if is_hidden(entry.name):
            others.append((path, "hidden"))
        elif entry.is_dir():
            real = path.resolve()
            if real in seen:
                others.append((path, "a link back to a folder already read"))
            else:
                walk(path, images, others, seen | {real})
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            if entry.stat().st_size == 0:  # a failed download or copy: known before the split is drawn
                others.append((path, "an empty file (0 bytes)"))
            else:
                images.append(path)
        elif entry.is_file():
            others.append((path, f"not an image: Pillow opens no {path.suffix or 'extension-less'} files"))
        else:
            others.append((path, "neither a file nor a folder (a broken link?)"))


def class_order(names) -> list[str]:
    """Natural order; when all ten CIFAR-10 names are there, they come first in torchvision's order, so that the
    indices 0-9 keep the meaning the README gives them (3 = cat) whatever else is in the folder."""
    names = sorted(names, key=natural_key)
    if set(CIFAR10_CLASSES) <= set(names):
        names = list(CIFAR10_CLASSES) + [n for n in names if n not in CIFAR10_CLASSES]
    return names




## --------------------------------------------------------------------------------------------------------
## The sources (their interface: data.py's "Sources" comment).

class ImageFolder(Source):
    """root/{train,test}/<class>/<image>, read as a person sees it (see the module docstring)."""

    def __init__(self, root, load_size: int, whole: bool = False):
        self.root, self.load_size, self.whole = Path(root), load_size, whole  # whole: images.square's geometry
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root} (pass --data-dir DIR with train/ and test/ in it)")
        for split in ("train", "test"):
            if not (self.root / split).is_dir():
                mvtec = any((p / "train" / "good").is_dir() for p in self.root.iterdir() if p.is_dir())
                hint = " (it looks like an MVTec AD folder: add --dataset mvtec)" if mvtec else ""
                raise DataError(f"{self.root} has no {split}/ folder: expected {self.root}/{split}/<class>/<image>"
                                + hint)
        scans = {split: scan_split(self.root / split) for split in ("train", "test")}
        self.classes = class_order(scans["train"].folders)
        if not self.classes:
            raise DataError(f"{self.root}/train has no class folders: expected {self.root}/train/<class>/<image>")
        self.test_only = sorted((n for n in scans["test"].folders if n not in scans["train"].folders),
                                key=natural_key)
        self.folders = self.classes + self.test_only
        self.normal_classes = [i for i, n in enumerate(self.classes) if n in scans["test"].folders]
        self.files, self.labels, self.skipped = {}, {}, []  # skipped: entries that are no class or no image
        for split, scan in scans.items():
            pairs = [(f, i) for i, name in enumerate(self.folders) for f in scan.folders.get(name, [])]
            self.files[split] = [f for f, _ in pairs]
            self.labels[split] = np.array([i for _, i in pairs], dtype=np.int64)
            self.skipped += [(str(p), why) for p, why in scan.not_classes + scan.not_images]
            self._say_left_out(split, scan)
        if self.classes[:10] == list(CIFAR10_CLASSES) and len(self.classes) > 10:
            note(f"{self.root}: classes 0-9 are CIFAR-10's in torchvision order; the other train/ folders follow: "
                 + named(f"{i}={n}" for i, n in enumerate(self.classes) if i >= 10))
        self.left_out = list(self.skipped)  # and every image file refused when decoded, as they are met
        self._said = set()
        self._decoded = {}  # (split, index) -> (uint8 (S, S, 3) array, notes) or (None, reason)

    def _say_left_out(self, split, scan: SplitScan):
        where = f"{self.root}/{split}"
        if scan.not_classes:
            what = counted(len(scan.not_classes), "entry that is not a class folder",
                           "entries that are not class folders")
            note(f"{where}: left out {what}: "
                 + named(f"{p.name} ({why})" for p, why in scan.not_classes))
        if scan.not_images:
            what = counted(len(scan.not_images), "file that is not an image", "files that are not images")
            note(f"{where}: skipped {what}: "
                 + named(f"{self.rel(p, split)} ({why})" for p, why in scan.not_images))
        if scan.nested:
            note(f"{where}: images in subfolders of class folders belong to that class: "
                 + named(f"{n} {k}" for n, k in scan.nested.items()))

    def rel(self, path, split) -> str:
        return str(Path(path).relative_to(self.root / split))

    def class_has_images(self, split: str, label: int) -> bool:
        return bool((self.labels[split] == label).any())

    def _decode(self, path: Path):
        try:
            a, notes = read_image(path)
        except UnreadableImage as e:
            return None, str(e)
        a, resized = square(a, self.load_size, self.whole)
        return a, notes + [resized] * bool(resized)

    def images(self, split: str, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Decode the chosen images as a viewer shows them (cached). Files that cannot be shown are left out and
        named with the reason, and what decoding did is noted, once each. Returns (uint8 images, kept idx)."""
        new = [int(i) for i in idx if (split, int(i)) not in self._decoded]
        for i in new:
            self._decoded[split, i] = self._decode(self.files[split][i])
        refused, notes = self.decode_report(split, new)
        self.left_out += refused
        if refused:
            what = counted(len(refused), "unreadable image file", "unreadable image files")
            note(f"{self.root}/{split}: skipped {what}: "
                 + named(f"{self.rel(p, split)} ({why})" for p, why in refused)
                 + " (the split was drawn with them listed; delete or repair them for the split without them)")
        for line in notes:
            note(f"{self.root}/{split}: {line}")
        kept = np.array([i for i in idx if self._decoded[split, int(i)][0] is not None], dtype=np.int64)
        arrays = [self._decoded[split, int(i)][0] for i in kept]
        sizes = Counter(a.shape[0] for a in arrays)  # every image is square and at most load_size now (square())
        if len(sizes) > 1:
            # one tensor holds them all: the odd ones take the most common size (storing all at load_size instead
            # would multiply the memory of a 32 px data set by 64 for a single large photo among them)
            side = sizes.most_common(1)[0][0]
            odd = Counter(f"{a.shape[0]}x{a.shape[1]}" for a in arrays if a.shape[0] != side)
            self._note_once(f"{self.root}/{split}: images of several sizes: "
                            f"{named(f'{n} of {s}' for s, n in odd.items())} resized to {side}x{side}, the most "
                            f"common size here, to be stored with the others")
            arrays = [a if a.shape[0] == side else np.asarray(Image.fromarray(a).resize((side, side), Image.BILINEAR))
                      for a in arrays]
        if not arrays:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), kept
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), kept

    def decode_report(self, split: str, idx) -> tuple[list, list]:
        """For decoded images idx: the files left out [(path, reason)], and one line per kind of change made
        ('3 images turned upright by the EXIF orientation (e.g. cat/1.jpg)')."""
        refused, kinds = [], {}
        for i in idx:
            a, what = self._decoded[split, int(i)]
            path = self.files[split][int(i)]
            if a is None:
                refused.append((str(path), what))
                continue
            for phrase in what:
                kinds.setdefault(phrase, []).append(self.rel(path, split))
        lines = [f"{len(paths)} image{'s' * (len(paths) > 1)} {phrase} (e.g. {paths[0]})"
                 for phrase, paths in kinds.items()]
        return refused, lines

    def _note_once(self, message: str):
        if message not in self._said:
            self._said.add(message)
            note(message)


class TorchvisionCIFAR10(Source):
    """The original CIFAR-10 binaries through torchvision, downloaded into root on first use."""

    def __init__(self, root):
        import torchvision
        self.root, self.classes = Path(root), list(CIFAR10_CLASSES)
        self.test_only, self.folders, self.normal_classes = [], self.classes, list(range(10))
        self.files, self.left_out, self.skipped = None, [], []
        self._data, self.labels = {}, {}
        created = not self.root.exists()
        for split in ("train", "test"):
            try:
                ds = torchvision.datasets.CIFAR10(str(self.root), train=split == "train", download=True)
            except Exception as e:  # no network, a full disk, a damaged archive
                if created and self.root.is_dir() and not any(self.root.rglob("*.tar.gz")):
                    shutil.rmtree(self.root, ignore_errors=True)  # a failed first download leaves no folder behind
                raise self.failed(e) from None
            self._data[split] = ds.data  # (N, 32, 32, 3) uint8
            self.labels[split] = np.array(ds.targets, dtype=np.int64)

    def failed(self, e: Exception) -> Exception:
        """The one line for a failed torchvision CIFAR-10: a damaged file in root (torchvision then tries to
        download it again, and offline says only that the network is down), a full disk, or no network."""
        damaged = damaged_cifar10(self.root)
        if damaged:
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            return DataError(f"{damaged[0]} is damaged{more}: its md5 is not the one torchvision publishes (a "
                             f"truncated copy or an interrupted download); delete it and run again to download "
                             f"CIFAR-10 afresh, or see 'Without network' in the README")
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            return write_error(e.filename or self.root / "cifar-10-python.tar.gz", e.strerror)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return DataError(f"could not get CIFAR-10 into {self.root} ({reason}); without network, see 'Without "
                         f"network' in the README: --data-dir takes an image folder with train/<class>/ and "
                         f"test/<class>/")

    def class_has_images(self, split: str, label: int) -> bool:
        return True

    def images(self, split: str, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return torch.from_numpy(self._data[split][idx]).permute(0, 3, 1, 2).contiguous(), idx

    def decode_report(self, split: str, idx) -> tuple[list, list]:
        return [], []


def damaged_cifar10(root: Path) -> list[str]:
    """The files of a torchvision CIFAR-10 download in root (the archive, the batches extracted from it) that are
    there but whose md5 is not the one torchvision checks them against: '<path> (<size> bytes)' each."""
    from torchvision.datasets.cifar import CIFAR10
    from torchvision.datasets.utils import check_integrity
    files = [(root / CIFAR10.filename, CIFAR10.tgz_md5)] + [
        (root / CIFAR10.base_folder / name, md5) for name, md5 in CIFAR10.train_list + CIFAR10.test_list]
    return [f"{f} ({f.stat().st_size} bytes)" for f, md5 in files if f.is_file() and not check_integrity(str(f), md5)]


def open_source(data_dir=None, data_root="./data", image_size=224, crop_pct=CROP_PCT, dataset="cifar10"):
    """An image folder (--data-dir) whose images are stored at the recipe's resize side by its geometry (crop_pct 1:
    the whole image resized to a square; otherwise the shorter side resized and the center cropped, see
    images.square), an MVTec AD root (dataset "mvtec"; its masks take the same geometry), or torchvision's
    CIFAR-10 (downloaded into data_root)."""
    side, whole = resize_size(image_size, crop_pct), crop_pct >= 1  # crop_pct 1: the whole image, resized
    if dataset == "mvtec":
        from mvtec import MVTecAD  # mvtec.py builds on ImageFolder
        if not data_dir:
            raise DataError("--dataset mvtec needs --data-dir: the MVTec AD folder (one folder per category)")
        return MVTecAD(data_dir, side, whole)
    if not data_dir:
        return TorchvisionCIFAR10(data_root)
    folder = ImageFolder(data_dir, side, whole)
    if (folder.root / "ground_truth").is_dir():  # an MVTec AD category read as a plain image folder
        note(f"{folder.root}/ground_truth (defect masks) is not read without --dataset mvtec; for pixel AUROC and "
             f"PRO: --dataset mvtec --data-dir {folder.root.parent} --cls {folder.root.name}")
    return folder



## --------------------------------------------------------------------------------------------------------
## --cls: which class is normal.

DIGITS = re.compile(r"[0-9]+")


def class_index(source, cls) -> int:
    """The index (into source.classes) of the normal class named by --cls, checked that it can be normal.
    cls: an int is an index (as config.json stores it). A string is an exact class folder name, 'name:X',
    'index:N', or a bare number, which is an index unless the class folders are named by numbers (0..11): there it
    is a folder's name. Refused as ambiguous, with how to say which: a number naming one folder and indexing
    another while the other folders have word names, a number naming no folder where they are numbers, and a
    number whose CIFAR-10 class is another than its folder here (see cifar_meaning). Raises DataError."""
    label = resolve_class(source, cls)
    name = source.classes[label]
    if not source.class_has_images("test", label):
        raise DataError(f"class {name!r} has no images in test/ of {source.root}: it can only be an anomaly in "
                        f"validation; put its test images in test/{name}/ or choose another class")
    return label


def resolve_class(source, cls) -> int:
    names = source.classes
    if isinstance(cls, (int, np.integer)):
        return checked_index(source, int(cls), str(cls))
    cls = str(cls)
    numbered = all(DIGITS.fullmatch(n) for n in names)  # folders 0, 1, 2 ...: a number is a name there
    if cls in names:
        i = names.index(cls)
        if DIGITS.fullmatch(cls) and not numbered and int(cls) < len(names) and int(cls) != i:
            raise DataError(f"--cls {cls} is ambiguous: folder '{cls}' is class {i}, and class {cls} is folder "
                            f"'{names[int(cls)]}': write --cls name:{cls} or --cls index:{cls}")
        return i
    if cls.startswith("name:") and cls[5:] in names:
        return names.index(cls[5:])
    if cls.startswith("index:") and DIGITS.fullmatch(cls[6:]):
        return checked_index(source, int(cls[6:]), cls)
    if cls.removeprefix("name:") in source.test_only:
        raise DataError(f"folder {cls.removeprefix('name:')!r} is only in test/ (it has no training images), so it "
                        f"can only be anomalous: choose one of {choices(source)}")
    if DIGITS.fullmatch(cls) and numbered and int(cls) < len(names):
        raise DataError(f"--cls {cls} is ambiguous: the class folders are named by numbers and none is '{cls}': "
                        f"write --cls index:{cls} for class {cls} (folder '{names[int(cls)]}'), or a folder's name")
    if DIGITS.fullmatch(cls):
        cifar_meaning(source, int(cls))
        return checked_index(source, int(cls), cls)
    raise no_class(source, cls)


def cifar_meaning(source, i: int):
    """The README numbers CIFAR-10's classes 0-9 (3 = cat). Where the class folders carry CIFAR-10
    names but not all ten (all ten keep those indices, see class_order), a number meaning another class here than
    in CIFAR-10 is refused rather than read one way."""
    names = source.classes
    if i >= 10 or not set(names) & set(CIFAR10_CLASSES):
        return
    cifar, here = CIFAR10_CLASSES[i], (names[i] if i < len(names) else None)
    if here == cifar or (here is None and cifar not in names):
        return
    where = f"class {names.index(cifar)} here" if cifar in names else "not among these folders"
    if here is None:
        raise DataError(f"--cls {i}: on CIFAR-10, {i} is {cifar} ({where}), and there is no class {i} here: "
                        f"write --cls {cifar}")
    raise DataError(f"--cls {i} is ambiguous: on CIFAR-10, {i} is {cifar} ({where}), and here class {i} is folder "
                    f"'{here}': write --cls {here if cifar not in names else cifar} or --cls index:{i}")


def checked_index(source, i: int, cls: str) -> int:
    if not 0 <= i < len(source.classes):
        raise no_class(source, cls)
    return i


def choices(source) -> str:
    return named((f"{i}={n}" for i, n in enumerate(source.classes)), shown=20)


def no_class(source, cls: str) -> DataError:
    only = f"; only in test/, anomalous: {named(source.test_only)}" if source.test_only else ""
    return DataError(f"no class {cls!r}: choose an index 0-{len(source.classes) - 1} or a name "
                     f"({choices(source)}{only})")

