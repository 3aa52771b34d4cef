"""MVTec AD: the layout (masks paired by name), the localisation metrics against brute-force computations, and the
whole path on a generated MVTec-layout folder (textures with drawn defects and their masks)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.measure import label as components

import data
import evaluate
import folders
import train
from helpers import vgg16_file
from mvtec import fit_mask


def mvtec_folder(root, categories=("grid", "bottle"), n_train=12, n_good=3, defects=("crack", "hole"), n_defect=3,
                 size=40, seed=0) -> tuple[str, dict]:
    """<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}. 'grid' is
    grayscale (mode L, as MVTec's grid, screw and zipper), the others RGB: a striped texture, and a defect drawn as
    a bright disc whose pixels are its mask (0/255). Returns the root and {test file: the mask drawn}."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    drawn = {}
    for c, category in enumerate(categories):
        def texture(c=c):
            stripes = 100 + 40 * np.sin((xx + rng.integers(0, 6)) * (0.5 + 0.2 * c))
            return np.clip(stripes + rng.normal(0, 8, (size, size)), 0, 255)

        def save(a, path, category=category):
            path.parent.mkdir(parents=True, exist_ok=True)
            grey = category == "grid"
            img = a.astype(np.uint8) if grey else np.stack([a, a * 0.8, a * 0.6], -1).astype(np.uint8)
            Image.fromarray(img, mode="L" if grey else "RGB").save(path)
        base = Path(root) / category
        for i in range(n_train):
            save(texture(), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good):
            save(texture(), base / "test" / "good" / f"{i:03d}.png")
        for defect in defects:
            for i in range(n_defect):
                a = texture()
                cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(3, 7)
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                a[mask] = 250
                path = base / "test" / defect / f"{i:03d}.png"
                save(a, path)
                (base / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                truth = base / "ground_truth" / defect / f"{i:03d}_mask.png"
                Image.fromarray((mask * 255).astype(np.uint8)).save(truth)
                drawn[str(path)] = mask
    return str(root), drawn


## --------------------------------------------------------------------------------------------------------
## The metrics against brute force.

def brute_force_pro(maps, masks, limit=0.3):
    """PRO as its definition reads, one threshold at a time: components from scikit-image (8-connected), FPR
    over the defect-free pixels, the curve from (0, 0) to (1, 1), trapezoids up to `limit` with the last one cut
    at the limit by linear interpolation, divided by the limit."""
    regions = [(i, components(m, connectivity=2) == k) for i, m in enumerate(masks)
               for k in range(1, components(m, connectivity=2).max() + 1)]
    ok = ~masks
    curve = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        fpr = (maps[ok] >= t).sum() / ok.sum()
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        curve.append((float(fpr), float(pro)))
    curve.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def brute_force_auroc(scores, labels):
    """Probability that a positive outscores a negative, ties counting one half (Mann-Whitney)."""
    pos, neg = scores[labels], scores[~labels]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed, levels", [(0, None), (1, 5), (2, 3), (3, None)])
def test_pro_and_pixel_auroc_match_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 9, 9), dtype=bool)
    masks[0, 1:4, 1:3] = True                    # a 3x2 region
    masks[0, 6, 6] = masks[0, 7, 7] = True       # diagonal neighbours: one 8-connected region of 2
    masks[1, 2:8, 4] = True                      # a 6-pixel line; image 2 is defect-free
    maps = rng.random(masks.shape) + 0.6 * masks
    if levels:  # few distinct values: many ties, each tie one threshold
        maps = np.round(maps * levels) / levels
    got, expected = evaluate.pro_score(maps, masks), brute_force_pro(maps, masks)
    assert got == pytest.approx(expected, abs=1e-12)
    assert evaluate.pixel_auroc(maps, masks) == pytest.approx(brute_force_auroc(maps.ravel(), masks.ravel()))


def test_pro_weighs_every_region_the_same():
    masks = np.zeros((1, 12, 12), dtype=bool)
    masks[0, :6, :6] = True   # a large region, found
    masks[0, 10, 10] = True   # a one-pixel region, missed
    maps = np.where(masks, 0.0, 0.5)
    maps[0, :6, :6] = 1.0
    # at FPR 0 half the regions are covered, whatever their sizes; pixel AUROC counts pixels instead
    assert evaluate.pro_score(maps, masks, fpr_limit=1e-9) == pytest.approx(0.5, abs=1e-6)
    assert evaluate.pixel_auroc(maps, masks) > 0.97
    perfect = masks.astype(float)
    assert evaluate.pro_score(perfect, masks) == pytest.approx(1.0) and evaluate.pixel_auroc(perfect, masks) == 1.0
    assert evaluate.pro_score(perfect, np.zeros_like(masks)) is None


## --------------------------------------------------------------------------------------------------------
## The layout.

def test_masks_are_paired_by_name_and_grayscale_reads_as_rgb(tmp_path, capsys):
    root, drawn = mvtec_folder(tmp_path / "mvtec")
    crack = Path(root) / "grid" / "test" / "crack"
    (crack / "000.png").unlink()  # an image gone: pairing by order would shift every later mask
    (Path(root) / "grid" / "ground_truth" / "hole" / "notes.txt").write_text("x")
    (Path(root) / "license.txt").write_text("CC BY-NC-SA 4.0")
    source = folders.open_source(root, image_size=40, crop_pct=1.0, dataset="mvtec")
    assert source.classes == ["bottle", "grid"]
    err = capsys.readouterr().err
    assert "license.txt" in err and "left out 1 entry that is not a category" in err
    d = data.one_class_data(source, "grid")
    err = capsys.readouterr().err
    assert "crack/000_mask.png" in err and "hole/notes.txt" in err  # named, left out
    assert d.mvtec and d.class_name == "grid" and d.normal_class == 1
    assert len(d.test) == 3 + 2 + 3 and d.test_anomalous == {"crack": 2, "hole": 3}
    for i, f in enumerate(d.test_files):
        expected = drawn.get(f, np.zeros((40, 40), dtype=bool))
        assert torch.equal(d.test_masks[i], torch.from_numpy(expected)), f
    grey = d.train[0]  # a grayscale PNG: three equal channels, its own pixel values
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    first = np.array(Image.open(Path(root) / "grid" / "train" / "good" / "000.png"))
    assert any(torch.equal(torch.from_numpy(first), im[0]) for im in d.train) or \
        any(torch.equal(torch.from_numpy(first), im[0]) for im in d.val)


def test_masks_follow_the_images_geometry(tmp_path):
    root, drawn = mvtec_folder(tmp_path / "mvtec", categories=("bottle",), size=64)
    source = folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec")
    d = data.one_class_data(source, "bottle")
    assert d.test.shape[-2:] == (32, 32) and d.test_masks.shape[-2:] == (32, 32)
    for i, f in enumerate(d.test_files):
        if f in drawn:  # the mask halved: a defect pixel where any of its 2x2 was defective
            halved = drawn[f].reshape(32, 2, 32, 2).any(axis=(1, 3))
            assert torch.equal(d.test_masks[i], torch.from_numpy(halved)), f


def test_a_thin_scratch_survives_the_resize():
    scratch = np.zeros((1024, 1024), dtype=np.float32)
    scratch[500:503, 100:900] = 1  # 3 px wide, 800 px long
    spot = np.zeros((1024, 1024), dtype=np.float32)
    spot[10:13, 10:13] = 1
    for mask in (scratch, spot):
        small, _ = fit_mask(mask, 128, whole=True)
        assert small.any() and small.sum() <= 2 * mask.sum() / 64 + 2 * 128  # found, and not much larger


def test_layout_problems_are_one_line(tmp_path):
    root, _ = mvtec_folder(tmp_path / "mvtec", categories=("bottle",))
    with pytest.raises(data.DataError, match="is one category: pass the folder holding the categories"):
        folders.open_source(Path(root) / "bottle", image_size=32, crop_pct=1.0, dataset="mvtec")
    with pytest.raises(data.DataError, match="looks like an MVTec AD folder: add --dataset mvtec"):
        folders.open_source(root, image_size=32)  # an MVTec root read as an image folder
    cifar_like = tmp_path / "pets"
    (cifar_like / "train" / "cat").mkdir(parents=True)
    with pytest.raises(data.DataError, match="an image folder, not MVTec AD: drop --dataset mvtec"):
        folders.open_source(cifar_like, image_size=32, crop_pct=1.0, dataset="mvtec")
    with pytest.raises(data.DataError, match="needs --data-dir"):
        folders.open_source(None, image_size=32, dataset="mvtec")
    mask = Path(root) / "bottle" / "ground_truth" / "hole" / "001_mask.png"
    mask.rename(mask.with_name("x.png"))
    source = folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec")
    with pytest.raises(data.DataError, match=r"test image test/hole/001.png has no mask: expected "
                                             r"ground_truth/hole/001_mask.png"):
        data.one_class_data(source, "bottle")
    Image.new("L", (20, 20)).save(mask)
    with pytest.raises(data.DataError, match="is 20x20, its image 40x40"):
        data.one_class_data(source, "bottle")


def test_a_category_read_as_an_image_folder_says_its_masks_are_not_read(tmp_path, capsys):
    root, _ = mvtec_folder(tmp_path / "mvtec", categories=("bottle",), n_train=10, defects=("hole",), n_defect=1)
    source = folders.open_source(Path(root) / "bottle", image_size=32)  # good normal, hole anomalous: it runs
    assert source.classes == ["good"] and source.test_only == ["hole"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{root}/bottle/ground_truth (defect masks) is not read without --dataset mvtec" in last
    assert f"--dataset mvtec --data-dir {root} --cls bottle" in last
    data.one_class_data(folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec"), "bottle")
    assert "is not read" not in capsys.readouterr().err  # read as MVTec AD: the masks are read


## --------------------------------------------------------------------------------------------------------
## The whole path.

def test_all_categories_train_score_localise_and_tabulate(tmp_path, capsys):
    root, _ = mvtec_folder(tmp_path / "mvtec")
    teacher = vgg16_file(tmp_path / "vgg.safetensors")
    out = tmp_path / "runs"
    argv = ["--backbone", "vgg", "--dataset", "mvtec", "--data-dir", root, "--cls", "all", "--teacher", teacher,
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out)]
    assert train.main(argv) == 0  # on the CPU, as evaluate_run below, which must reproduce its figures
    printed = capsys.readouterr().out
    assert "MVTec AD category bottle" in printed and "pixel AUROC" in printed and "PRO" in printed
    results = json.loads((out / "0-bottle" / "results.json").read_text())
    for key in ("test_auroc", "pixel_auroc", "pro", "pixel_auroc_mismatch", "pro_mismatch"):
        assert 0 <= results[key] <= 1, key
    assert results["val_auroc"] is None  # train/ holds good images only
    settings = json.loads((out / "0-bottle" / "config.json").read_text())["settings"]
    assert (settings["lam"], settings["crop_pct"], settings["teacher_mean"]) == (0.5, 1.0, [0.0] * 3)  # the recipe
    md = (out / "table.md").read_text()
    assert "pixel AUROC (%)" in md and "PRO (%)" in md and "| 0 | bottle |" in md and "| 1 | grid |" in md
    assert "published (%)" in md and "99.39" in md and "Salehi et al. 2021" in md  # bottle's published figure
    pytest.importorskip("matplotlib")
    again = evaluate.evaluate_run(out / "1-grid", torch.device("cpu"), plots="mismatch")  # one scoring for both
    saved = json.loads((out / "1-grid" / "results.json").read_text())
    assert again["pro"] == pytest.approx(saved["pro"], abs=1e-6)
    assert (out / "1-grid" / "maps-mismatch.png").stat().st_size > 10_000


## --------------------------------------------------------------------------------------------------------
## Non-square images (3:2, like VisA): each recipe's geometry, images and masks alike.

def wide_category(root, n_defect=4, edge=True) -> tuple[str, dict]:
    """<root>/wide/ with 96x64 RGB images (width x height) and, with edge=True, every defect (a 6x6 square) in the
    outer sixth of the width, where a center crop to 64x64 cuts it away. Returns the root and {test file: mask}."""
    rng = np.random.default_rng(1)
    base, drawn = Path(root) / "wide", {}

    def save(path, a):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.astype(np.uint8)).save(path)
    for split, n in (("train", 8), ("test", 2)):
        for i in range(n):
            save(base / split / "good" / f"{i:03d}.png", rng.integers(60, 120, (64, 96, 3)))
    for i in range(n_defect):
        a, mask = rng.integers(60, 120, (64, 96, 3)), np.zeros((64, 96), dtype=bool)
        x = (rng.integers(0, 10) if i % 2 else rng.integers(80, 90)) if edge else rng.integers(20, 70)
        y = rng.integers(5, 50)
        mask[y:y + 6, x:x + 6] = True
        a[mask] = 250
        save(base / "test" / "broken" / f"{i:03d}.png", a)
        save(base / "ground_truth" / "broken" / f"{i:03d}_mask.png", mask * 255)
        drawn[str(base / "test" / "broken" / f"{i:03d}.png")] = mask
    return str(root), drawn


def test_mvtec_recipes_resize_the_whole_image_and_its_mask(tmp_path, capsys):
    root, drawn = wide_category(tmp_path / "wide")
    source = folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec")  # the MVTec recipes' geometry
    d = data.one_class_data(source, "wide")
    assert "resized as a whole to 32x32, as the recipe does (aspect ratio not kept)" in capsys.readouterr().err
    for i, f in enumerate(d.test_files):
        whole = np.array(Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR))  # Resize([32, 32])
        assert torch.equal(d.test[i], torch.from_numpy(whole).permute(2, 0, 1)), f
        if f in drawn:  # every defect kept, where any of its pixels was (PIL's BOX filter over 3x2 pixels)
            boxed = np.asarray(Image.fromarray(drawn[f].astype(np.float32), mode="F").resize((32, 32), Image.BOX))
            assert d.test_masks[i].any() and torch.equal(d.test_masks[i], torch.from_numpy(boxed > 1e-6)), f


def test_a_mask_the_geometry_empties_is_named(tmp_path, capsys):
    root, drawn = wide_category(tmp_path / "wide")
    source = folders.open_source(root, image_size=28, crop_pct=data.CROP_PCT, dataset="mvtec")  # a crop recipe
    d = data.one_class_data(source, "wide")
    (lost,) = [line for line in capsys.readouterr().err.splitlines() if "every defect pixel" in line]
    assert "wide/test: 4 defect masks lose every defect pixel to the recipe's center crop (100% of all" in lost
    assert "broken/000.png" in lost and "scored as anomalous though the network never sees their defect" in lost
    assert not d.test_masks.any()
    empty = Path(root) / "wide" / "ground_truth" / "broken" / "001_mask.png"
    Image.new("L", (96, 64)).save(empty)  # a defective image whose mask holds no defect pixel
    data.one_class_data(folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec"), "wide")
    assert "1 defective image has an empty mask (no defect pixel): broken/001.png" in capsys.readouterr().err


def test_a_changed_mask_is_refused_for_a_recorded_run(tmp_path):
    import record
    root, _ = wide_category(tmp_path / "wide", edge=False)
    d = data.one_class_data(folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec"), "wide")
    saved = {"settings": {"class_name": "wide"}, "images": record.image_record(
        folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec"), d, root)}
    assert len(saved["images"]["splits"]["test"]["masks"]) == 4  # the masks are part of what the run scored
    again = record.data_as_recorded(folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec"), "wide",
                                    0, None, saved, root)
    assert torch.equal(again.test_masks, d.test_masks) and again.mvtec and again.class_name == "wide"
    Image.new("L", (96, 64), 255).save(Path(root) / "wide" / "ground_truth" / "broken" / "002_mask.png")
    with pytest.raises(record.ImagesChanged, match=r"masks: 1 of 4 changed or gone \(e.g. wide/ground_truth/broken/"
                                                   r"002_mask.png\)"):
        record.data_as_recorded(folders.open_source(root, image_size=32, crop_pct=1.0, dataset="mvtec"), "wide", 0,
                                None, saved, root)
