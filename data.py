"""One-class CIFAR-10 (or any image folder) for KDAD: folders read as a person sees them, the honest split, and
preprocessing done per batch.

The protocol (one-class CIFAR-10, as the README states it; the original code validated on the test set):
- a seeded, stratified 10% of the *training* split is held out as validation (all classes, labelled);
- the training set is the normal-class images of the remaining 90%;
- the test set is the whole test split, labelled normal (0) / anomalous (1), and is only scored once, at the end.

Image folders (`ImageFolder`) are read the way a person looking at them sees them:
- root/train/<class>/ and root/test/<class>/ hold the images; files in subfolders of a class folder belong to that
  class (as in torchvision's ImageFolder). Hidden entries, loose files and folders without images are not classes:
  they are left out and named once.
- The classes that can be chosen with --cls are the folders of train/ that hold images, in natural order (2 before
  10). When all ten CIFAR-10 names are among them, 0-9 keep CIFAR-10's torchvision order (3 is cat) and the other
  folders follow. Folders only in test/ (test/<defect> in the usual anomaly-detection layout) are anomalous only.
- Every image is decoded to the 8-bit RGB picture an image viewer shows (`read_image`), or left out and named with
  the reason.

Images are kept as one uint8 tensor per split (CIFAR-10 is 180 MB as uint8) on the training device, and the
recipe's preprocessing (resize 32 -> 256, crop 224, flip, normalise with the teacher's mean/std) runs on whole
batches there (`Preprocess`). `PerImageDataset` is the plain path the reference code takes (PIL per image in
DataLoader workers); the two compute the same images, which tests/test_data.py checks.

Sources: `ImageFolder` reads an image folder (--data-dir); `TorchvisionCIFAR10` downloads CIFAR-10 into --data-root;
`MVTecAD` reads an MVTec AD root (--dataset mvtec), one ImageFolder per category plus its defect masks.
"""
import glob
import io
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NORMAL, ANOMALOUS = 0, 1  # test labels; scores are "higher = more anomalous" (evaluate.py)
SHOWN = 5  # at most this many names in one printed line; the full lists stay in `left_out`


class DataError(ValueError):
    """Data that cannot be used; the message says what is wrong and what to do."""


class UnreadableImage(Exception):
    """One image file that cannot be shown faithfully; str(e) is the reason, in one line."""


CROP_PCT = 224 / 256  # the CIFAR-10 recipes resize to 256 and crop 224 (timm's name for the ratio: crop_pct)


def resize_size(image_size: int, crop_pct: float = CROP_PCT) -> int:
    """The side images are resized to before the crop: 256 for a 224 crop; other crops keep the ratio (32 -> 37).
    crop_pct = 1 (the MVTec recipes) resizes straight to the crop size: the whole image is kept."""
    return round(image_size / crop_pct)


def note(message: str):
    """Everything left out or changed is said once, on stderr, beside the run's own output."""
    print(f"note: {message}", file=sys.stderr)


def counted(n: int, one: str, many: str) -> str:
    """'1 file that is not an image' / '3 files that are not images'."""
    return f"{n} {one if n == 1 else many}"


def named(items, shown=SHOWN) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more': a bounded list of names for one printed line."""
    items = [str(i) for i in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


## --------------------------------------------------------------------------------------------------------
## One image file as a viewer shows it: upright, first frame, transparency on white, 8-bit sRGB.

def openable_extensions() -> frozenset:
    """File extensions of the formats Pillow opens, from Pillow's own registry (save-only formats such as PDF
    are not in it). MPO (multi-picture JPEG) is opened by the JPEG plugin, so it has no opener of its own."""
    Image.init()
    return frozenset(e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO")


IMAGE_EXTENSIONS = openable_extensions()
ORIENTATION = 0x0112  # the EXIF tag: 1 = upright, 2-8 = mirrored and/or turned (what a viewer undoes)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path) -> tuple[np.ndarray, list[str]]:
    """The picture an image viewer shows for `path`: (H, W, 3) uint8 RGB, and notes on what it took (each a short
    phrase, e.g. 'turned upright by the EXIF orientation'). Raises UnreadableImage(reason) for a file that
    cannot be shown faithfully. What a viewer does, step by step:
    - the first frame of an animated or multi-page file (noted);
    - the EXIF orientation undone (ImageOps.exif_transpose: JPEG, PNG eXIf, TIFF, WebP);
    - 16-bit samples shown as their top 8 bits (what Pillow itself does for 48-bit RGB, and libpng's strip-16);
      floating-point samples in 0..1 scaled to 0..255; 32-bit integers and floats outside 0..1 refused;
    - transparency (alpha, a transparent palette entry or colour key) composited onto white, as a page shows it;
    - an embedded ICC colour profile converted to sRGB (Pillow's ImageCms); CMYK without one by Pillow's formula;
    - palette, 1-bit, grey, YCbCr, HSV and LAB converted to RGB.
    Pillow's decompression-bomb limit stays: a file over it is refused, with its size and the limit."""
    notes = []
    with warnings.catch_warnings():  # between 1x and 2x Image.MAX_IMAGE_PIXELS Pillow only warns: it is read
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    notes.append("shown by their first frame (animated or multi-page)")
                sixteen = ";16" in str(im.tile[0][3] if im.tile else "")  # e.g. 48-bit RGB PNG: 'RGB;16B'
                turned = orientation(im, notes) != 1  # asked before loading: Pillow turns TIFFs as it loads
                im.load()
                if orientation(im, []) != 1:
                    im = ImageOps.exif_transpose(im)
                if turned:
                    notes.append("turned upright by the EXIF orientation")
                return as_rgb8(im, sixteen, notes), notes
        except Image.DecompressionBombError:
            raise UnreadableImage(bomb_reason(path)) from None
        except UnreadableImage:
            raise
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError ... on bad files
            raise UnreadableImage(pillow_reason(e)) from None


def pillow_reason(e: Exception) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image Pillow can identify (damaged, empty, or another kind of file under an image name)"
    text = " ".join(str(e).split()) or type(e).__name__
    return f"Pillow cannot decode it: {text}"


def bomb_reason(path) -> str:
    """The real size against Pillow's decompression-bomb limit (read with the limit lifted: the header only)."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as im:
            size = f"{im.width}x{im.height} = {im.width * im.height / 1e6:.3g} megapixels"
    except Exception:
        size = "its size"
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return (f"{size} is over Pillow's decompression-bomb limit of {2 * limit / 1e6:.3g} megapixels "
            f"(2 x PIL.Image.MAX_IMAGE_PIXELS): shrink the file (it is resized for the network anyway)")


def orientation(im: Image.Image, notes: list) -> int:
    """The EXIF orientation (2-8: mirrored and/or turned), else 1. A broken EXIF block is ignored, as viewers do."""
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception:
        notes.append("with an unreadable EXIF block: shown as stored")
        return 1
    return value if value in range(2, 9) else 1


def as_rgb8(im: Image.Image, sixteen: bool, notes: list) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 sRGB, or UnreadableImage. See read_image for the rules."""
    icc = im.info.get("icc_profile")
    if im.mode in SIXTEEN_BIT + ("I", "F"):
        im = Image.fromarray(high_bits_to_8(im, notes))  # mode L
    elif sixteen:
        notes.append("with 16-bit samples: shown as their top 8 bits")
    if has_transparency(im):
        im = on_white(im, notes)  # L or RGB
    if im.mode in ("1", "P", "RGBX", "YCbCr", "HSV"):  # to the grey or RGB values they stand for
        im = im.convert("L" if im.mode == "1" else "RGB")
    if icc and im.mode in ("L", "RGB", "CMYK"):
        im = with_profile(im, icc, notes)
    if im.mode == "CMYK":
        notes.append("in CMYK without a usable colour profile: converted by Pillow's plain formula")
    if im.mode == "LAB":
        im = lab_to_srgb(im)
        notes.append("in CIE L*a*b*: converted to sRGB")
    elif im.mode in ("L", "CMYK"):
        im = im.convert("RGB")
    if im.mode != "RGB":
        raise UnreadableImage(f"pixel format {im.mode!r}: no faithful way to show it as 8-bit RGB")
    return np.asarray(im).copy()


def high_bits_to_8(im: Image.Image, notes: list) -> np.ndarray:
    """Grey samples of more than 8 bits -> uint8 by the range their format declares, never clipped."""
    if "transparency" in im.info:
        raise UnreadableImage(f"{im.mode} samples with a transparent colour key: no faithful way to show it")
    a = np.asarray(im)
    if im.mode in SIXTEEN_BIT or (im.mode == "I" and declares_16_bits(im) and 0 <= a.min() and a.max() <= 65535):
        notes.append("with 16-bit samples: shown as their top 8 bits")
        return (a.astype(np.uint32) >> 8).astype(np.uint8)
    if im.mode == "I":
        raise UnreadableImage("32-bit integer samples have no standard range to show: save it with 8- or 16-bit "
                              "samples")
    if not np.isfinite(a).all():
        raise UnreadableImage("floating-point samples with NaN or infinity: no picture to show")
    if a.min() < 0 or a.max() > 1:
        raise UnreadableImage(f"floating-point samples from {a.min():g} to {a.max():g}: viewers show 0..1 as "
                              f"black..white; save it scaled to 0..1 or with 8- or 16-bit samples")
    notes.append("with floating-point samples in 0..1: scaled to 0..255")
    return np.round(a * 255).astype(np.uint8)


def declares_16_bits(im: Image.Image) -> bool:
    """Pillow's mode I holds 16-bit PNG/PPM samples (PPM already scaled to 0..65535), or TIFF's declared bits."""
    if im.format in ("PNG", "PPM"):
        return True
    tags = getattr(im, "tag_v2", {})
    return im.format == "TIFF" and tuple(tags.get(258, ()))[:1] == (16,) and tags.get(339, 1) in (1, (1,))


def has_transparency(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def on_white(im: Image.Image, notes: list) -> Image.Image:
    """Composite onto white (out = c * a + 255 * (1 - a), rounded), as a page shows a transparent image."""
    grey = im.mode in ("1", "L", "LA", "La")
    a = np.asarray(im.convert("LA" if grey else "RGBA")).astype(np.uint32)  # (H, W, 2 or 4)
    colour, alpha = a[..., :-1], a[..., -1:]
    if (alpha < 255).any():
        notes.append("with transparent pixels: shown on white")
    out = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return Image.fromarray(out[..., 0] if grey else out)


@lru_cache(maxsize=16)
def srgb_transform(icc: bytes, mode: str):
    """A Pillow ImageCms transform from an embedded profile to sRGB, built once per distinct profile."""
    from PIL import ImageCms  # Pillow's littlecms binding, in every Pillow wheel
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGB",
                                   renderingIntent=ImageCms.getDefaultIntent(src))


def with_profile(im: Image.Image, icc: bytes, notes: list) -> Image.Image:
    """Convert through the embedded ICC profile to sRGB; a profile that cannot be used is ignored, as a viewer
    ignores it, and noted."""
    try:
        from PIL import ImageCms
        out = ImageCms.applyTransform(im, srgb_transform(icc, im.mode))
    except Exception as e:  # ImportError (Pillow without littlecms), a damaged or mismatched profile
        why = " ".join(str(e).split())[:80] or type(e).__name__
        notes.append(f"with a colour profile that cannot be used ({why}): shown without it")
        return im
    if np.asarray(out).tobytes() != np.asarray(im.convert("RGB")).tobytes():  # an sRGB profile changes nothing
        notes.append("converted to sRGB by the embedded colour profile")
    return out


def lab_to_srgb(im: Image.Image) -> Image.Image:
    from PIL import ImageCms
    try:
        return ImageCms.applyTransform(im, ImageCms.buildTransform(ImageCms.createProfile("LAB"),
                                                                   ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    except Exception as e:
        raise UnreadableImage(f"CIE L*a*b* pixels could not be converted to sRGB ({e})") from None


def square(a: np.ndarray, side: int) -> tuple[np.ndarray, str | None]:
    """The stored form of one image (H, W, 3) -> (S, S, 3): square images up to `side` stay as they are (CIFAR-10
    stays 32 px); others get the resize the preprocessing does anyway (shorter side -> `side`, bilinear and
    antialiased, as torchvision's Resize) and a center crop to a square. Returns the note on what was done."""
    h, w = a.shape[:2]
    if h == w and h <= side:
        return a, None
    s = side / min(h, w)
    size = (max(side, round(w * s)), max(side, round(h * s)))  # PIL sizes are (width, height)
    im = Image.fromarray(a).resize(size, Image.BILINEAR)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    what = (f"larger than {side}x{side}: resized to it" if h == w else
            f"not square: resized to {side} px on the shorter side and center-cropped")
    return np.asarray(im), what


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
## Sources: class names, labels of every image, and uint8 images (n, 3, H, W) on demand. Both sources offer:
##   classes         the classes --cls can name, in index order (train/ folders holding images)
##   test_only       folders only in test/: anomalous only; labels index into `folders` = classes + test_only
##   normal_classes  indices of the classes that can be normal (images in train/ and test/): what --cls all runs
##   files, labels   per split; left_out: every (path, reason) left out so far

class ImageFolder:
    """root/{train,test}/<class>/<image>, read as a person sees it (see the module docstring)."""

    def __init__(self, root, load_size: int):
        self.root, self.load_size = Path(root), load_size
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root} (pass --data-dir DIR with train/ and test/ in it)")
        for split in ("train", "test"):
            if not (self.root / split).is_dir():
                mvtec = any((p / "train" / MVTEC_NORMAL).is_dir() for p in self.root.iterdir() if p.is_dir())
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
        a, resized = square(a, self.load_size)
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
                 + named(f"{self.rel(p, split)} ({why})" for p, why in refused))
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


class TorchvisionCIFAR10:
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
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"could not get CIFAR-10 into {self.root} ({reason}); without network, see 'Without "
                                f"network' in the README: --data-dir takes an image folder with train/<class>/ and "
                                f"test/<class>/") from None
            self._data[split] = ds.data  # (N, 32, 32, 3) uint8
            self.labels[split] = np.array(ds.targets, dtype=np.int64)

    def class_has_images(self, split: str, label: int) -> bool:
        return True

    def images(self, split: str, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return torch.from_numpy(self._data[split][idx]).permute(0, 3, 1, 2).contiguous(), idx

    def decode_report(self, split: str, idx) -> tuple[list, list]:
        return [], []


def open_source(data_dir=None, data_root="./data", image_size=224, crop_pct=CROP_PCT, dataset="cifar10"):
    """An image folder (--data-dir) whose images are stored at the recipe's resize side, an MVTec AD root
    (dataset "mvtec"), or torchvision's CIFAR-10 (downloaded into data_root)."""
    side = resize_size(image_size, crop_pct)
    if dataset == "mvtec":
        if not data_dir:
            raise DataError("--dataset mvtec needs --data-dir: the MVTec AD folder (one folder per category)")
        return MVTecAD(data_dir, side)
    return ImageFolder(data_dir, side) if data_dir else TorchvisionCIFAR10(data_root)


## --------------------------------------------------------------------------------------------------------
## MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021): one image folder per category, whose normal class is `good`,
## plus a pixel mask for every defective test image:
##     <root>/<category>/train/good/*.png           normal training images
##     <root>/<category>/test/good/*.png            normal test images (no masks)
##     <root>/<category>/test/<defect>/*.png        anomalous test images, one folder per kind of defect
##     <root>/<category>/ground_truth/<defect>/<name>_mask.png   the defect's pixels (non-zero) of test/<defect>/<name>
## Masks are paired with their images by name, never by order.

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_NORMAL = "good"


class MVTecAD:
    """An MVTec AD root: its categories (folders holding train/good) are the classes --cls chooses among; each is
    read by ImageFolder with `good` as the normal class (one_class_data does this). Anything else in the root is
    left out and named once."""

    def __init__(self, root, load_size: int):
        self.root, self.load_size = Path(root), load_size
        if not self.root.is_dir():
            raise DataError(f"MVTec AD folder not found: {self.root} (pass --data-dir DIR with one folder per "
                            f"category, e.g. DIR/bottle/train/good)")
        entries = listing(self.root)
        self.classes = [e.name for e in entries if not is_hidden(e.name) and (Path(e.path) / "train" /
                                                                               MVTEC_NORMAL).is_dir()]
        if not self.classes:
            if (self.root / "train" / MVTEC_NORMAL).is_dir():
                hint = f"{self.root} is one category: pass the folder holding the categories, {self.root.parent}"
            elif (self.root / "train").is_dir():
                hint = "it holds train/ and test/ class folders: an image folder, not MVTec AD: drop --dataset mvtec"
            else:
                hint = f"expected {self.root}/<category>/train/{MVTEC_NORMAL}/"
            raise DataError(f"{self.root} holds no MVTec AD category: {hint}")
        self.skipped = [(e.path, "not a category (no train/good/ in it)") for e in entries
                        if e.name not in self.classes]
        if self.skipped:
            what = counted(len(self.skipped), "entry that is not a category", "entries that are not categories")
            note(f"{self.root}: left out {what}: "
                 + named(Path(p).name for p, _ in self.skipped))
        self.test_only, self.folders = [], self.classes
        self.normal_classes = list(range(len(self.classes)))
        self.files, self.left_out = None, list(self.skipped)

    def class_has_images(self, split: str, label: int) -> bool:
        return (self.root / self.classes[label] / split / MVTEC_NORMAL).is_dir()

    def category(self, name: str) -> ImageFolder:
        folder = ImageFolder(self.root / name, self.load_size)
        if MVTEC_NORMAL not in folder.classes:
            raise DataError(f"{folder.root}/train has no readable {MVTEC_NORMAL}/ images")
        return folder


def mvtec_masks(category_root: Path, test_files: list, side: int) -> torch.Tensor:
    """(N, side, side) bool defect masks of the test images, paired by name: test/<defect>/<name>.<ext> has
    ground_truth/<defect>/<name>_mask.png; test/good images have none (all False). Each mask goes through the
    geometry its image goes through (square() to the stored side, then the preprocessing's resize to `side`), and a
    pixel there is defective where any part of it is: a thin scratch or a small spot of a 1024 px image stays a
    region at 128 px (regions grow by up to a pixel instead). Raises DataError for a defective image without its
    mask, or a mask of another size than its image."""
    category_root = Path(category_root)
    out = np.zeros((len(test_files), side, side), dtype=bool)
    for i, f in enumerate(map(Path, test_files)):
        defect = f.relative_to(category_root / "test").parts[0]
        if defect == MVTEC_NORMAL:
            continue
        mask_path = category_root / "ground_truth" / defect / f"{f.stem}_mask.png"
        if not mask_path.is_file():
            raise DataError(f"test image {f.relative_to(category_root)} has no mask: expected "
                            f"{mask_path.relative_to(category_root)}")
        with Image.open(mask_path) as m, Image.open(f) as im:
            if m.size != im.size:
                raise DataError(f"mask {mask_path.relative_to(category_root)} is {m.size[0]}x{m.size[1]}, its image "
                                f"{im.size[0]}x{im.size[1]}: they must match pixel for pixel")
            mask = (np.asarray(ImageOps.exif_transpose(m).convert("L")) > 0).astype(np.float32)
        out[i] = square_mask(mask, side)
    orphans = [p for p in sorted((category_root / "ground_truth").glob("*/*"))
               if not p.stem.endswith("_mask") or not any((category_root / "test" / p.parent.name).glob(
                   glob.escape(p.stem.removesuffix("_mask")) + ".*"))]
    if orphans:
        what = counted(len(orphans), "file pairs", "files pair")
        note(f"{category_root}/ground_truth: {what} with no test image (expected "
             f"<defect>/<name>_mask.png beside test/<defect>/<name>) and are left out: "
             + named(str(p.relative_to(category_root / "ground_truth")) for p in orphans))
    return torch.from_numpy(out)


def square_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """A 0/1 mask (H, W) float -> (side, side) bool with square()'s geometry (shorter side to `side`, center crop)
    and area averaging (PIL's BOX filter): a pixel is defective where any part of it was."""
    h, w = mask.shape
    s = side / min(h, w)
    size = (max(side, round(w * s)), max(side, round(h * s)))
    im = Image.fromarray(mask, mode="F").resize(size, Image.BOX)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side))) > 1e-6  # float sums: not exactly 0


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


## --------------------------------------------------------------------------------------------------------
## The split. Everything is seeded and derived from the index lists, so a run can be rebuilt exactly.

def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out val_fraction of every class (seeded); returns sorted (train, val) indices."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def limit_labelled(idx: np.ndarray, anomalous: np.ndarray, limit: int | None, seed: int, split: str) -> np.ndarray:
    """At most `limit` images, normal and anomalous in their original proportion, at least one of each."""
    if limit is None or limit >= len(idx):
        return idx
    n_normal = (~anomalous).sum()
    if n_normal in (0, len(idx)):  # one kind only: one_class_data says what that means
        return idx[:limit]
    keep_normal = min(n_normal, max(1, round(limit * n_normal / len(idx))))
    keep_anomalous = limit - keep_normal
    if keep_anomalous < 1 or keep_normal < 1:
        raise DataError(f"--limit {limit} leaves no room for both normal and anomalous {split} images; use "
                        f"--limit 2 or more")
    rng = np.random.default_rng(seed)
    pick = [rng.permutation(idx[~anomalous])[:keep_normal], rng.permutation(idx[anomalous])[:keep_anomalous]]
    return np.sort(np.concatenate(pick))


@dataclass
class OneClassData:
    """uint8 images (n, 3, H, W) of each split; val/test labels are NORMAL / ANOMALOUS. From an image folder,
    *_files are the image paths in the order of the images (None for torchvision's CIFAR-10), *_anomalous the
    anomalous images per class folder, left_out every (path, reason) left out of this run, notes what decoding
    changed in its images (one line per kind)."""
    normal_class: int
    class_name: str
    train: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    train_files: list | None = None
    val_files: list | None = None
    test_files: list | None = None
    val_anomalous: dict = field(default_factory=dict)
    test_anomalous: dict = field(default_factory=dict)
    left_out: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    test_masks: torch.Tensor | None = None  # MVTec AD: (n_test, R, R) bool defect pixels at the stored side R
    mvtec: bool = False  # class_name is then an MVTec AD category, whose normal images are its good/ folder

    def to(self, device):
        for name in ("train", "val", "val_labels", "test", "test_labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def val_has_anomalies(self) -> bool:
        """False in the layout train/good, test/good, test/<defect>: then validation AUROC cannot be computed."""
        return bool((self.val_labels == ANOMALOUS).any())

    def summary(self) -> str:
        def counts(y):
            return f"{(y == NORMAL).sum().item()} normal + {(y == ANOMALOUS).sum().item()} anomalous"
        which = f"class {self.normal_class} ({self.class_name})"
        if self.test_files is not None:
            which = f"class {self.normal_class} (folder {self.class_name!r})"
        if self.mvtec:
            which = f"MVTec AD category {self.class_name} (normal: {MVTEC_NORMAL}/)"
        val = counts(self.val_labels) + ("" if self.val_has_anomalies else
                                         " (train/ has no other class: no validation AUROC)")
        kinds = named((f"{k} {n}" for k, n in self.test_anomalous.items()), shown=12)
        return (f"{which}: train {len(self.train)} normal images, val {val}, test {counts(self.test_labels)}"
                + (f" ({kinds})" if kinds else ""))

    def record(self) -> dict:
        """What a run record should keep about its data (JSON-ready)."""
        return {"class_folder": self.class_name, "val_anomalous": self.val_anomalous,
                "test_anomalous": self.test_anomalous, "left_out": [list(p) for p in self.left_out],
                "notes": self.notes}


def one_class_data(source, cls, seed=0, limit=None, val_fraction=0.1) -> OneClassData:
    """The protocol's three splits for normal class `cls` (see class_index). Validation may hold no anomalous
    image (train/ with the normal class only); the test split must hold both kinds. For MVTec AD, `cls` is a
    category: its good/ images are normal, every defect folder anomalous, and test_masks holds the defects' pixels.
    Raises DataError."""
    if isinstance(source, MVTecAD):
        label = class_index(source, cls)
        folder = source.category(source.classes[label])
        data = one_class_data(folder, MVTEC_NORMAL, seed, limit, val_fraction)
        data.test_masks = mvtec_masks(folder.root, data.test_files, folder.load_size)
        data.normal_class, data.class_name, data.mvtec = label, source.classes[label], True
        return data
    label = class_index(source, cls)
    name = source.classes[label]
    train_labels, test_labels = source.labels["train"], source.labels["test"]
    train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    train_idx = train_idx[train_labels[train_idx] == label][:limit]  # only the normal class is trained on
    val_idx = limit_labelled(val_idx, train_labels[val_idx] != label, limit, seed, "validation")
    test_idx = limit_labelled(np.arange(len(test_labels)), test_labels != label, limit, seed, "test")

    chosen = {"train": train_idx, "val": val_idx, "test": test_idx}
    both, kept = source.images("train", np.concatenate([train_idx, val_idx]))  # one decoding report for train/
    in_train = np.isin(kept, train_idx)
    train, val = both[torch.from_numpy(in_train)], both[torch.from_numpy(~in_train)]
    train_idx, val_idx = kept[in_train], kept[~in_train]
    test, test_idx = source.images("test", test_idx)
    val_y = torch.from_numpy((train_labels[val_idx] != label).astype(np.int64))
    test_y = torch.from_numpy((test_labels[test_idx] != label).astype(np.int64))
    if len(train) == 0:
        raise DataError(f"no readable training images of class {name!r}")
    if not (train_labels[chosen["val"]] == label).any():
        raise DataError(f"no validation image of class {name!r}: {val_fraction:.0%} of its training images, "
                        f"rounded, is none; it needs more training images")
    for part, y in (("validation", val_y), ("test", test_y)):
        if not (y == NORMAL).any():
            raise DataError(f"no readable {part} images of class {name!r} (see the notes above)")
    if not (test_y == ANOMALOUS).any():
        raise DataError(f"the test images are all of class {name!r}: anomaly detection needs anomalous test "
                        f"images (other folders in test/); check the folder or raise --limit")

    left_out, notes = list(source.skipped), []
    for split, part in (("train", "train"), ("train", "val"), ("test", "test")):
        refused, lines = source.decode_report(split, chosen[part])
        left_out += refused
        notes += [f"{part}: {line}" for line in lines]

    def per_folder(labels, idx):
        return dict(Counter(source.folders[c] for c in labels[idx] if c != label))

    def paths(split, idx):
        return None if source.files is None else [str(source.files[split][i]) for i in idx]
    return OneClassData(label, name, train, val, val_y, test, test_y, paths("train", train_idx),
                        paths("train", val_idx), paths("test", test_idx), per_folder(train_labels, val_idx),
                        per_folder(test_labels, test_idx), left_out, notes)


## --------------------------------------------------------------------------------------------------------
## Preprocessing on whole batches, on the device: uint8 (B, 3, h, w) -> normalised float (B, 3, S, S).

@dataclass
class Augment:
    """Per-image crop offsets and flips for one batch, drawn once so both data paths use the same ones."""
    top: torch.Tensor   # (B,) long
    left: torch.Tensor  # (B,) long
    flip: torch.Tensor  # (B,) bool

    def __getitem__(self, sl: slice) -> "Augment":
        return Augment(self.top[sl], self.left[sl], self.flip[sl])


def center(n: int, image_size: int, crop_pct: float = CROP_PCT) -> Augment:
    off = int(round((resize_size(image_size, crop_pct) - image_size) / 2.0))  # torchvision's CenterCrop rounding
    return Augment(torch.full((n,), off), torch.full((n,), off), torch.zeros(n, dtype=torch.bool))


def random_augment(n: int, image_size: int, generator: torch.Generator, crop_pct: float = CROP_PCT) -> Augment:
    """RandomCrop(image_size) from the resized image + RandomHorizontalFlip(0.5)."""
    span = resize_size(image_size, crop_pct) - image_size + 1
    top = torch.randint(span, (n,), generator=generator)
    left = torch.randint(span, (n,), generator=generator)
    return Augment(top, left, torch.rand(n, generator=generator) < 0.5)


class Preprocess:
    """Resize (bilinear, antialiased) -> crop -> flip -> normalise, for a whole uint8 batch at once. The geometry
    (crop size, resize side) is the recipe's; center() and random_augment() draw crops that fit it."""

    def __init__(self, image_size: int, mean, std, device, channels_last=False, crop_pct: float = CROP_PCT):
        self.size, self.crop_pct, self.resize = image_size, crop_pct, resize_size(image_size, crop_pct)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.channels_last = channels_last

    def center(self, n: int) -> Augment:
        return center(n, self.size, self.crop_pct)

    def random_augment(self, n: int, generator: torch.Generator) -> Augment:
        return random_augment(n, self.size, generator, self.crop_pct)

    def __call__(self, x: torch.Tensor, aug: Augment) -> torch.Tensor:
        x = x.float() / 255
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", antialias=True, align_corners=False)
        x = self.crop_flip(x, aug)
        return self.layout((x - self.mean) / self.std)

    def layout(self, x):
        """The memory layout the networks want: channels_last (NHWC) for the VGG convolutions."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def crop_flip(self, x, aug: Augment):
        B, S, dev = x.shape[0], self.size, x.device
        ar = torch.arange(S, device=dev)
        rows = aug.top.to(dev)[:, None] + ar                                          # (B, S)
        cols = aug.left.to(dev)[:, None] + torch.where(aug.flip.to(dev)[:, None], S - 1 - ar, ar)  # flip = reversed
        b = torch.arange(B, device=dev)[:, None, None]
        return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, 3, S, S)


## --------------------------------------------------------------------------------------------------------
## The plain path (what the reference code does): PIL per image in DataLoader workers. Used by bench.py and by
## `train.py --plain` to show that the fast path computes the same thing.

class PerImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, prep: Preprocess):
        self.images = images.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) for PIL
        self.size, self.resize = prep.size, prep.resize
        self.mean, self.std = prep.mean.cpu().view(3, 1, 1), prep.std.cpu().view(3, 1, 1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, top, left, flip = item  # the batch sampler hands over the image index and its augmentation
        im = Image.fromarray(self.images[i]).resize((self.resize, self.resize), Image.BILINEAR)
        im = im.crop((left, top, left + self.size, top + self.size))
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)  # HWC -> CHW
        return (x - self.mean) / self.std


def batches(images: torch.Tensor, order: torch.Tensor, aug: Augment, batch_size: int, prep: Preprocess,
            plain=False, workers=2):
    """Yield (indices, preprocessed batch) over images[order], batch by batch, with augmentation `aug`
    (aug[j] belongs to image order[j]). plain=True takes the reference code's path: PIL, one image at a time."""
    starts = range(0, len(order), batch_size)
    if plain:
        items = list(zip(order.tolist(), aug.top.tolist(), aug.left.tolist(), aug.flip.tolist(), strict=True))
        # its own generator: a DataLoader otherwise draws its worker seed from the global one, shifting dropout
        loader = torch.utils.data.DataLoader(PerImageDataset(images, prep), num_workers=workers,
                                             batch_sampler=[items[i:i + batch_size] for i in starts],
                                             generator=torch.Generator().manual_seed(0))
        for i, x in zip(starts, loader, strict=True):
            yield order[i:i + batch_size], prep.layout(x.to(prep.mean.device))
        return
    for i in starts:
        idx = order[i:i + batch_size]  # stays on the CPU: a GPU would otherwise wait to hand it back for caches
        yield idx, prep(images[idx.to(images.device)], aug[i:i + batch_size])
