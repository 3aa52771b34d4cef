"""One-class CIFAR-10 (or any image folder) for KDAD: the honest split, and preprocessing done per batch.

The protocol (shared/docs/method.md, "One-class CIFAR-10"):
- a seeded, stratified 10% of the *training* split is held out as validation (all classes, labelled);
- the training set is the normal-class images of the remaining 90%;
- the test set is the whole test split, labelled normal (0) / anomalous (1), and is only scored once, at the end.

Images are kept as one uint8 tensor per split (CIFAR-10 is 180 MB as uint8) on the training device, and the
recipe's preprocessing (resize 32 -> 256, crop 224, flip, normalise with the teacher's mean/std) runs on whole
batches there (`Preprocess`). `PerImageDataset` is the plain path the reference code takes (PIL per image in
DataLoader workers); the two compute the same images, which tests/test_data.py checks.

Sources: `ImageFolder` reads root/train/<class>/* and root/test/<class>/* (e.g. ../shared/data/cifar10-jpeg);
`TorchvisionCIFAR10` downloads CIFAR-10 into --data-root.
"""
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
NORMAL, ANOMALOUS = 0, 1  # test labels; scores are "higher = more anomalous" (evaluate.py)


class DataError(ValueError):
    """Data that cannot be used; the message says what is wrong and what to do."""


def resize_size(image_size: int) -> int:
    """The recipe resizes to 256 and crops 224; other crops keep that ratio (32 -> 37)."""
    return round(image_size * 256 / 224)


## --------------------------------------------------------------------------------------------------------
## Sources: class names, labels of every image, and uint8 images (n, 3, H, W) on demand.

class ImageFolder:
    """root/{train,test}/<class>/<image>; classes are the sorted folder names under train/."""

    def __init__(self, root, load_size: int):
        self.root, self.load_size = Path(root), load_size
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root} (pass --data-dir DIR with train/ and test/ in it)")
        for split in ("train", "test"):
            if not (self.root / split).is_dir():
                raise DataError(f"{self.root} has no {split}/ folder: expected {self.root}/{split}/<class>/<image>")
        self.classes = sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())
        if not self.classes:
            raise DataError(f"{self.root}/train has no class folders: expected {self.root}/train/<class>/<image>")
        self.files, self.labels = {}, {}
        for split in ("train", "test"):
            files, labels, skipped = [], [], 0
            for label, name in enumerate(self.classes):
                for f in sorted((self.root / split / name).glob("*")):
                    if f.suffix.lower() in IMAGE_EXTENSIONS:
                        files.append(f)
                        labels.append(label)
                    elif f.is_file():
                        skipped += 1
            if skipped:
                print(f"{self.root}/{split}: skipped {skipped} files that are not images", file=sys.stderr)
            self.files[split], self.labels[split] = files, np.array(labels, dtype=np.int64)
        self._decoded = {}

    def class_has_images(self, split: str, label: int) -> bool:
        return bool((self.labels[split] == label).any())

    def _decode(self, path: Path):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.width != im.height or im.width > self.load_size:  # square it: shorter side, center crop
                    s = self.load_size / min(im.size)
                    w, h = (max(self.load_size, round(d * s)) for d in im.size)
                    im = im.resize((w, h), Image.BILINEAR)
                    left, top = (im.width - self.load_size) // 2, (im.height - self.load_size) // 2
                    im = im.crop((left, top, left + self.load_size, top + self.load_size))
                return np.asarray(im)
        except Exception:  # not an image after all, truncated, too large to trust: left out, and counted
            return None

    def images(self, split: str, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Decode the chosen images; unreadable files are left out and counted. Returns (uint8 images, kept idx)."""
        arrays, kept = [], []
        for i in idx:
            key = (split, int(i))
            if key not in self._decoded:
                self._decoded[key] = self._decode(self.files[split][i])
            if self._decoded[key] is not None:
                arrays.append(self._decoded[key])
                kept.append(i)
        bad = len(idx) - len(kept)
        if bad:
            print(f"{self.root}/{split}: skipped {bad} unreadable image files", file=sys.stderr)
        sizes = Counter(a.shape for a in arrays)
        if len(sizes) > 1:  # images of different sizes: bring all to the most common one
            shape = sizes.most_common(1)[0][0]
            arrays = [a if a.shape == shape else np.asarray(Image.fromarray(a).resize(shape[1::-1], Image.BILINEAR))
                      for a in arrays]
        if not arrays:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), np.array(kept, dtype=np.int64)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), np.array(kept, dtype=np.int64)


class TorchvisionCIFAR10:
    """The original CIFAR-10 binaries through torchvision, downloaded into root on first use."""

    def __init__(self, root):
        import torchvision
        self.root, self.classes = Path(root), list(CIFAR10_CLASSES)
        self._data, self.labels = {}, {}
        for split in ("train", "test"):
            try:
                ds = torchvision.datasets.CIFAR10(str(self.root), train=split == "train", download=True)
            except Exception as e:  # no network, a full disk, a damaged archive
                raise DataError(f"could not get CIFAR-10 into {self.root} ({e}); without network, point --data-dir "
                                f"at an image folder with train/<class>/ and test/<class>/") from None
            self._data[split] = ds.data  # (N, 32, 32, 3) uint8
            self.labels[split] = np.array(ds.targets, dtype=np.int64)

    def class_has_images(self, split: str, label: int) -> bool:
        return True

    def images(self, split: str, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return torch.from_numpy(self._data[split][idx]).permute(0, 3, 1, 2).contiguous(), idx


def open_source(data_dir=None, data_root="./data", image_size=224):
    return ImageFolder(data_dir, resize_size(image_size)) if data_dir else TorchvisionCIFAR10(data_root)


def class_index(source, cls) -> int:
    """--cls takes an index or a class name; anything else lists the valid choices."""
    names = source.classes
    label = int(cls) if str(cls).isdigit() else (names.index(cls) if cls in names else None)
    if label is None or not 0 <= label < len(names):
        choices = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise DataError(f"no class {cls!r}: choose an index 0-{len(names) - 1} or a name ({choices})")
    for split in ("train", "test"):
        if not source.class_has_images(split, label):
            raise DataError(f"class {names[label]!r} has no images in {split}/ of {source.root}")
    return label


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
    if n_normal in (0, len(idx)):  # one kind only: one_class_data refuses it with a clearer message
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
    """uint8 images (n, 3, H, W) of each split; val/test labels are NORMAL / ANOMALOUS."""
    normal_class: int
    class_name: str
    train: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor

    def to(self, device):
        for name in ("train", "val", "val_labels", "test", "test_labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def summary(self) -> str:
        def counts(y):
            return f"{(y == NORMAL).sum().item()} normal + {(y == ANOMALOUS).sum().item()} anomalous"
        return (f"class {self.normal_class} ({self.class_name}): train {len(self.train)} normal images, "
                f"val {counts(self.val_labels)}, test {counts(self.test_labels)}")


def one_class_data(source, cls, seed=0, limit=None, val_fraction=0.1) -> OneClassData:
    label = class_index(source, cls)
    train_labels, test_labels = source.labels["train"], source.labels["test"]
    train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    train_idx = train_idx[train_labels[train_idx] == label][:limit]  # only the normal class is trained on
    val_idx = limit_labelled(val_idx, train_labels[val_idx] != label, limit, seed, "validation")
    test_idx = limit_labelled(np.arange(len(test_labels)), test_labels != label, limit, seed, "test")

    train, _ = source.images("train", train_idx)
    val, val_idx = source.images("train", val_idx)
    test, test_idx = source.images("test", test_idx)
    if len(train) == 0:
        raise DataError(f"no readable training images of class {source.classes[label]!r}")
    def as_labels(y):
        return torch.from_numpy((y != label).astype(np.int64))
    val_y, test_y = as_labels(train_labels[val_idx]), as_labels(test_labels[test_idx])
    for name, y in (("validation", val_y), ("test", test_y)):
        if len(y) == 0 or y.min() == y.max():
            raise DataError(f"the {name} images are all of one kind (need normal and anomalous ones); "
                            f"check the folder or raise --limit")
    return OneClassData(label, source.classes[label], train, val, val_y, test, test_y)


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


def center(n: int, image_size: int) -> Augment:
    off = int(round((resize_size(image_size) - image_size) / 2.0))  # torchvision's CenterCrop rounding
    return Augment(torch.full((n,), off), torch.full((n,), off), torch.zeros(n, dtype=torch.bool))


def random_augment(n: int, image_size: int, generator: torch.Generator) -> Augment:
    """RandomCrop(image_size) from the resized image + RandomHorizontalFlip(0.5)."""
    span = resize_size(image_size) - image_size + 1
    top = torch.randint(span, (n,), generator=generator)
    left = torch.randint(span, (n,), generator=generator)
    return Augment(top, left, torch.rand(n, generator=generator) < 0.5)


class Preprocess:
    """Resize (bilinear, antialiased) -> crop -> flip -> normalise, for a whole uint8 batch at once."""

    def __init__(self, image_size: int, mean, std, device, channels_last=False):
        self.size, self.resize = image_size, resize_size(image_size)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.channels_last = channels_last

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


def progress(iterable, total: int, label: str, every: float = 2.0):
    """Yield from iterable; on a terminal, redraw 'label i/total' on stderr at most every `every` seconds."""
    show, last = sys.stderr.isatty(), time.time()
    for i, item in enumerate(iterable):
        yield item
        if show and time.time() - last > every:
            print(f"\r  {label} {i + 1}/{total}", end="", file=sys.stderr, flush=True)
            last = time.time()
    if show:
        print("\r" + " " * (len(label) + 24) + "\r", end="", file=sys.stderr, flush=True)
