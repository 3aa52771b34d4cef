"""MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021): one image folder per category, and the defect masks.

Plumbing beside data.py: each category is an ImageFolder (folders.py) whose normal class is `good`; this module
finds the categories and pairs every defective test image with its mask.
"""
import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from cli import counted, named, note
from data import VAL_FRACTION, DataError, one_class_data
from folders import ImageFolder, Source, is_hidden, listing

## The layout: one image folder per category, whose normal class is `good`, plus a pixel mask for every defective
## test image:
##     <root>/<category>/train/good/*.png           normal training images
##     <root>/<category>/test/good/*.png            normal test images (no masks)
##     <root>/<category>/test/<defect>/*.png        anomalous test images, one folder per kind of defect
##     <root>/<category>/ground_truth/<defect>/<name>_mask.png   the defect's pixels (non-zero) of test/<defect>/<name>
## Masks are paired with their images by name, never by order.

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_NORMAL = "good"


class MVTecAD(Source):
    """An MVTec AD root: its categories (folders holding train/good) are the classes --cls chooses among; each is
    read by ImageFolder with `good` as the normal class (one_class_data does this). Anything else in the root is
    left out and named once."""

    def __init__(self, root, load_size: int, whole: bool = True):
        self.root, self.load_size, self.whole = Path(root), load_size, whole  # whole: images.square's geometry
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
        self._categories = {}

    def class_has_images(self, split: str, label: int) -> bool:
        return (self.root / self.classes[label] / split / MVTEC_NORMAL).is_dir()

    def one_class_data(self, cls, seed=0, limit=None, val_fraction=VAL_FRACTION):
        """data.one_class_data of category `cls`: its good/ images normal, every defect folder anomalous, and
        test_masks holding the defects' pixels."""
        label = self.class_index(cls)
        folder = self.category(self.classes[label])
        return self.with_masks(one_class_data(folder, MVTEC_NORMAL, seed, limit, val_fraction), label)

    def with_masks(self, data, label: int):
        """The one-class data of category `label`'s folder as MVTec AD data: its test masks, its category."""
        folder = self.category(self.classes[label])
        data.test_masks = mvtec_masks(folder.root, data.test_files, folder.load_size, folder.whole)
        data.normal_class, data.class_name, data.mvtec = label, self.classes[label], True
        return data

    def category(self, name: str) -> ImageFolder:
        """The ImageFolder of one category (read once; its notes are said once)."""
        if name not in self._categories:
            folder = ImageFolder(self.root / name, self.load_size, self.whole)
            if MVTEC_NORMAL not in folder.classes:
                raise DataError(f"{folder.root}/train has no readable {MVTEC_NORMAL}/ images")
            self._categories[name] = folder
        return self._categories[name]


def mvtec_masks(category_root: Path, test_files: list, side: int, whole: bool = True) -> torch.Tensor:
    """(N, side, side) bool defect masks of the test images, paired by name: test/<defect>/<name>.<ext> has
    ground_truth/<defect>/<name>_mask.png; test/good images have none (all False). Each mask goes through the
    geometry its image goes through (images.square: the whole image resized to side x side, or the shorter side
    resized and the center cropped; see fit_mask), and a pixel there is defective where any part of it is: a thin
    scratch or a small spot of a 1024 px image stays a region at 128 px (regions grow by up to a pixel instead).
    What the geometry costs is named in a note: masks with no defect pixel left (the image is then scored as
    anomalous without a defect the network can see), the share of defect pixels cut away, and masks that hold no
    defect pixel at all. Raises DataError for a defective image without its mask, or a mask of another size than
    its image."""
    category_root = Path(category_root)
    out = np.zeros((len(test_files), side, side), dtype=bool)
    empty, lost_all, pixels, cut = [], [], 0, 0
    for i, f in enumerate(map(Path, test_files)):
        mask_path = mask_file(category_root, f)
        if mask_path is None:  # test/good
            continue
        if not mask_path.is_file():
            raise DataError(f"test image {f.relative_to(category_root)} has no mask: expected "
                            f"{mask_path.relative_to(category_root)}")
        with Image.open(mask_path) as m, Image.open(f) as im:
            if m.size != im.size:
                raise DataError(f"mask {mask_path.relative_to(category_root)} is {m.size[0]}x{m.size[1]}, its image "
                                f"{im.size[0]}x{im.size[1]}: they must match pixel for pixel")
            mask = (np.asarray(ImageOps.exif_transpose(m).convert("L")) > 0).astype(np.float32)
        out[i], before = fit_mask(mask, side, whole)
        name = str(f.relative_to(category_root / "test"))
        if not mask.any():
            empty.append(name)
        elif not out[i].any():
            lost_all.append(name)
        pixels, cut = pixels + before, cut + before - int(out[i].sum())
    where = f"{category_root.name}/test"
    if lost_all:
        note(f"{where}: {counted(len(lost_all), 'defect mask loses', 'defect masks lose')} every defect pixel to "
             f"the recipe's center crop ({cut / pixels:.0%} of all defect pixels are cut away): "
             f"{named(lost_all)}; these images are scored as anomalous though the network never sees their defect")
    elif cut:
        note(f"{where}: the recipe's center crop cuts away {cut / pixels:.0%} of the defect pixels")
    if empty:
        note(f"{where}: {counted(len(empty), 'defective image has', 'defective images have')} an empty mask (no "
             f"defect pixel): {named(empty)}; they count as anomalous images with nothing to localise")
    orphans = [p for p in sorted((category_root / "ground_truth").glob("*/*"))
               if not p.stem.endswith("_mask") or not any((category_root / "test" / p.parent.name).glob(
                   glob.escape(p.stem.removesuffix("_mask")) + ".*"))]
    if orphans:
        what = counted(len(orphans), "file pairs", "files pair")
        note(f"{category_root}/ground_truth: {what} with no test image (expected "
             f"<defect>/<name>_mask.png beside test/<defect>/<name>) and are left out: "
             + named(str(p.relative_to(category_root / "ground_truth")) for p in orphans))
    return torch.from_numpy(out)


def mask_file(category_root: Path, test_file: Path) -> Path | None:
    """ground_truth/<defect>/<name>_mask.png of test/<defect>/<name>.<ext>; None for a test/good image."""
    defect = Path(test_file).relative_to(Path(category_root) / "test").parts[0]
    return None if defect == MVTEC_NORMAL else Path(category_root) / "ground_truth" / defect / \
        f"{Path(test_file).stem}_mask.png"


def fit_mask(mask: np.ndarray, side: int, whole: bool = True) -> tuple[np.ndarray, int]:
    """A 0/1 mask (H, W) float -> ((side, side) bool, defect pixels before the crop) with images.square's geometry
    (whole: resized to side x side; otherwise the shorter side to `side`, then the center crop) and area averaging
    (PIL's BOX filter): a pixel is defective where any part of it was."""
    h, w = mask.shape
    if whole or h == w:
        size = (side, side)
    else:
        s = side / min(h, w)
        size = (max(side, round(w * s)), max(side, round(h * s)))  # PIL sizes are (width, height)
    resized = np.asarray(Image.fromarray(mask, mode="F").resize(size, Image.BOX)) > 1e-6  # float sums: not exactly 0
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    return resized[top:top + side, left:left + side], int(resized.sum())
