"""The one-class protocol on CIFAR-10 (and any image folder): which images are normal, which are held out, which
are scored, and the preprocessing each batch gets.

- a seeded, stratified 10% of the *training* split is held out as validation (all classes, labelled);
- the training set is the normal-class images of the remaining 90%;
- the test set is the whole test split, labelled normal (0) / anomalous (1), and is only scored once, at the end.
(The original code validated on the test set.)

Images are kept as one uint8 tensor per split (CIFAR-10 is 180 MB as uint8) on the training device, and the
recipe's preprocessing (resize 32 -> 256, crop 224, flip, normalise with the teacher's mean/std) runs on whole
batches there (`Preprocess`). `PerImageDataset` is the plain path the reference code takes (PIL per image in
DataLoader workers); the two compute the same images to within one grey level (PIL resizes in fixed point),
which tests/test_data.py checks.

Read in order: one_class_data (the split), then Preprocess and batches. Where the images come from (image folders
read as a person sees them, torchvision's CIFAR-10, MVTec AD) is folders.py's and mvtec.py's, which a first reading
can skip.
"""
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cli import named

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NORMAL, ANOMALOUS = 0, 1  # test labels; scores are "higher = more anomalous" (evaluate.py)
CROP_PCT = 224 / 256  # the CIFAR-10 recipes resize to 256 and crop 224 (timm's name for the ratio: crop_pct)


class DataError(ValueError):
    """Data that cannot be used; the message says what is wrong and what to do."""


def resize_size(image_size: int, crop_pct: float = CROP_PCT) -> int:
    """The side images are resized to before the crop: 256 for a 224 crop; other crops keep the ratio (32 -> 37).
    crop_pct = 1 (the MVTec recipes) resizes straight to the crop size: the whole image is kept."""
    return round(image_size / crop_pct)


## --------------------------------------------------------------------------------------------------------
## Sources (folders.open_source): class names, labels of every image, and uint8 images (n, 3, H, W) on demand.
## Every source offers:
##   classes         the classes --cls can name, in index order (train/ folders holding images)
##   class_index     --cls -> an index into classes (folders.class_index)
##   test_only       folders only in test/: anomalous only; labels index into `folders` = classes + test_only
##   normal_classes  indices of the classes that can be normal (images in train/ and test/): what --cls all runs
##   labels          per split, an int array; files per split (None for torchvision's CIFAR-10)
##   images(split, idx) -> (uint8 images, the idx that could be read); decode_report, skipped: what was left out


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
            which = f"MVTec AD category {self.class_name} (normal: good/)"
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


VAL_FRACTION = 0.1  # of every class of the training set, held out for validation (the protocol)


def one_class_data(source, cls, seed=0, limit=None, val_fraction=VAL_FRACTION) -> OneClassData:
    """The protocol's three splits for normal class `cls` (any --cls form, see folders.class_index). Validation may
    hold no anomalous image (train/ with the normal class only); the test split must hold both kinds. For MVTec AD,
    `cls` is a category: its good/ images are normal, every defect folder anomalous, and test_masks holds the
    defects' pixels. Raises DataError."""
    if hasattr(source, "one_class_data"):  # MVTec AD: one category's folder, and its masks (mvtec.py)
        return source.one_class_data(cls, seed, limit, val_fraction)
    label = source.class_index(cls)
    y_train, y_test = source.labels["train"], source.labels["test"]
    train_idx, val_idx = stratified_split(y_train, val_fraction, seed)  # 10% of every class held out
    train_idx = train_idx[y_train[train_idx] == label][:limit]         # only the normal class is trained on
    val_idx = limit_labelled(val_idx, y_train[val_idx] != label, limit, seed, "validation")
    test_idx = limit_labelled(np.arange(len(y_test)), y_test != label, limit, seed, "test")
    return load_splits(source, label, {"train": train_idx, "val": val_idx, "test": test_idx}, val_fraction)


def load_splits(source, label: int, chosen: dict, val_fraction: float) -> OneClassData:
    """Decode the chosen images (an unreadable file is left out and named) and label them; DataError when a split
    ends up without the images the protocol needs."""
    name = source.classes[label]
    y_train, y_test = source.labels["train"], source.labels["test"]
    both, kept = source.images("train", np.concatenate([chosen["train"], chosen["val"]]))  # one report for train/
    in_train = np.isin(kept, chosen["train"])
    train, val = both[torch.from_numpy(in_train)], both[torch.from_numpy(~in_train)]
    train_idx, val_idx = kept[in_train], kept[~in_train]
    test, test_idx = source.images("test", chosen["test"])
    val_y = torch.from_numpy((y_train[val_idx] != label).astype(np.int64))
    test_y = torch.from_numpy((y_test[test_idx] != label).astype(np.int64))
    if len(train) == 0:
        raise DataError(f"no readable training images of class {name!r}")
    if not (y_train[chosen["val"]] == label).any():
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
                        paths("train", val_idx), paths("test", test_idx), per_folder(y_train, val_idx),
                        per_folder(y_test, test_idx), left_out, notes)


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

    def to(self, device) -> "Augment":
        return Augment(self.top.to(device), self.left.to(device), self.flip.to(device))


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
    for i in starts:  # order and aug on the images' device: no copy, so no wait, per batch (train.epoch_batches)
        idx = order[i:i + batch_size]
        yield idx, prep(images[idx.to(images.device)], aug[i:i + batch_size])
