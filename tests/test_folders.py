"""Image folders read as a person sees them: which entries are classes, how --cls picks one, and every image file
decoded to the picture an image viewer shows (or left out, named, with the reason)."""
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

import data
import folders
import train
from data import ANOMALOUS, NORMAL, DataError
from helpers import vit_teacher_file
from images import UnreadableImage, read_image

SIZE = 16  # generated images are 16 x 16 unless a case needs another shape: stored as they are (<= 37 px)


def picture(seed, h=SIZE, w=SIZE) -> np.ndarray:
    """Random-looking content, different for every seed, so an image can be recognised by its pixels."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root, layout: dict) -> dict:
    """root/<split>/<folder>/<i>.png with n images per folder, from {split: {folder: n}}; returns
    {pixel bytes: (split, folder, file name)} to recognise every image that comes back."""
    seen, seed = {}, 0
    for split, classes in layout.items():
        for name, n in classes.items():
            (Path(root) / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                a = picture(seed)
                Image.fromarray(a).save(Path(root) / split / name / f"{i}.png")
                seen[a.tobytes()] = (split, name, f"{i}.png")
    return seen


def origins(images: torch.Tensor, seen: dict) -> list:
    return [seen[im.permute(1, 2, 0).numpy().tobytes()] for im in images]


def source_of(root):
    return folders.open_source(root, image_size=32)


## --------------------------------------------------------------------------------------------------------
## Report 1: class folders named with numbers.

def test_numbered_class_folders_pick_the_folder_of_that_name(tmp_path):
    numbers = [str(k) for k in range(12)]
    seen = make_folder(tmp_path, {"train": dict.fromkeys(numbers, 10), "test": dict.fromkeys(numbers, 3)})
    source = source_of(tmp_path)
    assert source.classes == numbers  # 2 before 10, as a person reads them
    d = data.one_class_data(source, "10", seed=0)
    assert d.normal_class == 10 and d.class_name == "10"
    assert {o[1] for o in origins(d.train, seen)} == {"10"}
    assert len(d.train) == 9 and (d.val_labels == NORMAL).sum() == 1 and (d.val_labels == ANOMALOUS).sum() == 11
    assert (d.test_labels == NORMAL).sum() == 3 and (d.test_labels == ANOMALOUS).sum() == 33
    assert [o[1] for o, y in zip(origins(d.test, seen), d.test_labels, strict=True) if y == NORMAL] == ["10"] * 3
    assert d.summary().startswith("class 10 (folder '10'): train 9 normal images")
    assert folders.class_index(source, "index:10") == folders.class_index(source, 10) == 10


def test_numbers_in_a_numbered_folder_are_names_and_gaps_are_refused(tmp_path):
    make_folder(tmp_path, {"train": {"1": 10, "2": 10, "3": 10}, "test": {"1": 2, "2": 2, "3": 2}})
    source = source_of(tmp_path)
    assert [folders.class_index(source, c) for c in ("1", "2", "3")] == [0, 1, 2]  # folder '2' is class 1
    assert folders.class_index(source, "index:2") == 2 and folders.class_index(source, "name:2") == 1
    with pytest.raises(DataError, match=r"--cls 0 is ambiguous: the class folders are named by numbers and none is "
                                        r"'0': write --cls index:0 for class 0 \(folder '1'\)"):
        folders.class_index(source, "0")
    with pytest.raises(DataError, match=r"no class '7': choose an index 0-2 or a name \(0=1, 1=2, 2=3\)"):
        folders.class_index(source, "7")


def test_a_number_naming_one_folder_and_indexing_another_is_refused(tmp_path):
    """Word names with one number among them: '--cls 3' could be folder '3' or class 3."""
    names = ["ant", "bee", "cow", "3"]
    make_folder(tmp_path, {"train": dict.fromkeys(names, 10), "test": dict.fromkeys(names, 2)})
    source = source_of(tmp_path)
    assert source.classes == ["3", "ant", "bee", "cow"]
    with pytest.raises(DataError, match=r"--cls 3 is ambiguous: folder '3' is class 0, and class 3 is folder 'cow': "
                                        r"write --cls name:3 or --cls index:3"):
        folders.class_index(source, "3")
    assert folders.class_index(source, "name:3") == 0 and folders.class_index(source, "index:3") == 3
    assert folders.class_index(source, "2") == 2  # no folder '2': an index


def test_the_ambiguous_refusal_is_one_line_from_train_py(tmp_path, capsys):
    make_folder(tmp_path / "d", {"train": {"1": 10, "2": 10}, "test": {"1": 2, "2": 2}})
    teacher = vit_teacher_file(tmp_path / "vit.safetensors")
    argv = ["--backbone", "vit", "--cls", "0", "--teacher", teacher, "--data-dir", str(tmp_path / "d"),
            "--image-size", "32", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --cls 0 is ambiguous") and "index:0" in err[-1]
    assert not (tmp_path / "r" / "config.json").exists()


## --------------------------------------------------------------------------------------------------------
## Report 2: test folders without a train/ twin, and the usual anomaly-detection layout.

def test_test_only_folders_are_anomalous_and_counted(tmp_path):
    seen = make_folder(tmp_path, {"train": {"cat": 20, "dog": 20}, "test": {"cat": 5, "dog": 5, "truck": 20}})
    source = source_of(tmp_path)
    assert source.classes == ["cat", "dog"] and source.test_only == ["truck"] and source.normal_classes == [0, 1]
    d = data.one_class_data(source, "cat", seed=0)
    assert (d.test_labels == NORMAL).sum() == 5 and (d.test_labels == ANOMALOUS).sum() == 25
    assert d.test_anomalous == {"dog": 5, "truck": 20}
    assert d.summary().endswith("test 5 normal + 25 anomalous (dog 5, truck 20)")
    # test_files line up with the test images and labels: what masks or a report pair by name
    for im, y, f in zip(d.test, d.test_labels, d.test_files, strict=True):
        split, folder, name = origins(im[None], seen)[0]
        assert Path(f) == tmp_path / split / folder / name and (y == NORMAL) == (folder == "cat")
    with pytest.raises(DataError, match="folder 'truck' is only in test/.*can only be anomalous: choose one of "
                                        "0=cat, 1=dog"):
        folders.class_index(source, "truck")


def test_good_and_defect_folders_validate_on_normal_images_only(tmp_path):
    """train/good, test/good, test/<defect>: validation holds normal images only (no validation AUROC)."""
    make_folder(tmp_path, {"train": {"good": 30}, "test": {"good": 4, "crack": 3, "hole": 5}})
    source = source_of(tmp_path)
    d = data.one_class_data(source, "good", seed=0)
    assert len(d.train) == 27 and len(d.val) == 3 and not d.val_has_anomalies
    assert d.test_anomalous == {"crack": 3, "hole": 5} and len(d.test) == len(d.test_files) == 12
    assert "val 3 normal + 0 anomalous (train/ has no other class: no validation AUROC)" in d.summary()
    assert data.one_class_data(source, "0", seed=0, limit=5).val_labels.tolist() == [NORMAL] * 3
    # the test split must still hold both kinds
    make_folder(tmp_path / "only_good", {"train": {"good": 30}, "test": {"good": 4}})
    with pytest.raises(DataError, match="the test images are all of class 'good': anomaly detection needs "
                                        "anomalous test images"):
        data.one_class_data(source_of(tmp_path / "only_good"), "good")


def test_a_class_without_test_images_gives_validation_anomalies_only(tmp_path):
    make_folder(tmp_path, {"train": {"a": 20, "b": 20, "c": 20}, "test": {"a": 3, "b": 3}})
    source = source_of(tmp_path)
    assert source.classes == ["a", "b", "c"] and source.normal_classes == [0, 1]  # what --cls all runs
    d = data.one_class_data(source, "a", seed=0)
    assert d.val_anomalous == {"b": 2, "c": 2} and d.test_anomalous == {"b": 3}
    with pytest.raises(DataError, match="class 'c' has no images in test/ .* it can only be an anomaly in "
                                        "validation"):
        folders.class_index(source, "c")


def test_too_few_images_for_a_validation_image(tmp_path):
    make_folder(tmp_path, {"train": {"a": 4, "b": 20}, "test": {"a": 3, "b": 3}})
    with pytest.raises(DataError, match="no validation image of class 'a'"):
        data.one_class_data(source_of(tmp_path), "a")


## --------------------------------------------------------------------------------------------------------
## What is a class, and what is not.

def test_cifar10_names_keep_their_indices_whatever_else_is_there(tmp_path, capsys):
    names = list(data.CIFAR10_CLASSES) + ["aardvark", "zebra"]
    seen = make_folder(tmp_path, {"train": dict.fromkeys(names, 10), "test": dict.fromkeys(names, 1) | {"apple": 3}})
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "train" / "0_empty").mkdir()
    source = source_of(tmp_path)
    assert source.classes == names and source.test_only == ["apple"]
    assert ("classes 0-9 are CIFAR-10's in torchvision order; the other train/ folders follow: 10=aardvark, "
            "11=zebra") in capsys.readouterr().err
    d = data.one_class_data(source, "3", seed=0)
    assert d.class_name == "cat" and {o[1] for o in origins(d.train, seen)} == {"cat"}
    assert source.normal_classes == list(range(12))


def test_numbers_keep_their_cifar10_meaning_or_are_refused(tmp_path):
    """Folders with some of CIFAR-10's names: a number that means another class there than here is refused."""
    no_airplane, no_truck = list(data.CIFAR10_CLASSES[1:]), list(data.CIFAR10_CLASSES[:9])
    for name, classes in (("no_airplane", no_airplane), ("no_truck", no_truck), ("two", ["cat", "dog"])):
        make_folder(tmp_path / name, {"train": dict.fromkeys(classes, 10), "test": dict.fromkeys(classes, 1)})
    source = source_of(tmp_path / "no_truck")
    assert folders.class_index(source, "3") == 3 and source.classes[3] == "cat"  # the same class either way
    source = source_of(tmp_path / "no_airplane")
    with pytest.raises(DataError, match=r"--cls 3 is ambiguous: on CIFAR-10, 3 is cat \(class 2 here\), and here "
                                        r"class 3 is folder 'deer': write --cls cat or --cls index:3"):
        folders.class_index(source, "3")
    assert folders.class_index(source, "cat") == 2 and folders.class_index(source, "index:3") == 3
    source = source_of(tmp_path / "two")
    with pytest.raises(DataError, match=r"--cls 0 is ambiguous: on CIFAR-10, 0 is airplane \(not among these "
                                        r"folders\), and here class 0 is folder 'cat': write --cls cat or --cls "
                                        r"index:0"):
        folders.class_index(source, "0")
    with pytest.raises(DataError, match=r"--cls 3: on CIFAR-10, 3 is cat \(class 0 here\), and there is no class 3 "
                                        r"here: write --cls cat"):
        folders.class_index(source, "3")
    with pytest.raises(DataError, match="no class '8'"):
        folders.class_index(source, "8")  # ship: in neither


def test_entries_that_are_not_classes_are_named_once_and_shift_nothing(tmp_path, capsys):
    layout = {"train": {"ant": 10, "bee": 10, "cow": 10}, "test": {"ant": 2, "bee": 2, "cow": 2}}
    make_folder(tmp_path / "clean", layout)
    seen = make_folder(tmp_path / "messy", layout)
    m = tmp_path / "messy"
    extras = {  # entry -> the reason the note gives for it
        "train/.DS_Store": "hidden", "train/.ipynb_checkpoints": "hidden", "test/__MACOSX": "hidden",
        "train/aaa": "an empty folder", "train/abc": "a folder with no images (1 other entries)",
        "test/stray.png": "a file directly in test/, not in a class folder",
    }
    (m / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (m / "train" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(picture(999)).save(m / "train" / ".ipynb_checkpoints" / "0-checkpoint.png")
    (m / "test" / "__MACOSX" / "ant").mkdir(parents=True)
    (m / "test" / "__MACOSX" / "ant" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (m / "train" / "aaa").mkdir()
    (m / "train" / "abc").mkdir()
    (m / "train" / "abc" / "readme.txt").write_text("notes")
    Image.fromarray(picture(998)).save(m / "test" / "stray.png")
    (m / "train" / "bee" / "notes.txt").write_text("a file in a class folder")
    (m / "train" / "bee" / ".DS_Store").write_bytes(b"\0")
    (m / "train" / "cow" / "more").mkdir()  # a subfolder of a class folder: its images are that class's
    Image.fromarray(picture(997)).save(m / "train" / "cow" / "more" / "x.png")
    seen[picture(997).tobytes()] = ("train", "cow", "more/x.png")

    clean = source_of(tmp_path / "clean")
    capsys.readouterr()
    messy = source_of(m)
    err = capsys.readouterr().err
    assert messy.classes == clean.classes == ["ant", "bee", "cow"] and messy.test_only == []
    for entry, why in extras.items():
        assert err.count(f" {Path(entry).name} ({why})") == 1, (entry, err)
    assert ("train: skipped 2 files that are not images: bee/.DS_Store (hidden), bee/notes.txt (not an image: "
            "Pillow opens no .txt files)") in err
    assert "images in subfolders of class folders belong to that class: cow 1" in err
    assert {(Path(p).relative_to(m).as_posix(), why) for p, why in messy.skipped} >= set(extras.items())
    d, d_clean = (data.one_class_data(s, "cow", seed=0) for s in (messy, clean))
    assert d.normal_class == d_clean.normal_class == 2
    assert len(d.train) + (d.val_labels == NORMAL).sum() == 11  # the 10 images of cow/ and the one in cow/more/
    assert ("train", "cow", "more/x.png") in origins(torch.cat([d.train, d.val]), seen)
    assert len(d.test) == len(d_clean.test) == 6  # test/stray.png is in no class
    assert {tuple(x) for x in json.loads(json.dumps(d.record()))["left_out"]} == set(messy.skipped)


def test_names_sort_as_a_person_reads_them():
    names = ["img10", "img2", "Img1", "b", "A", "10", "9", "x1y10", "x1y9"]
    assert sorted(names, key=folders.natural_key) == ["9", "10", "A", "b", "Img1", "img2", "img10", "x1y9", "x1y10"]
    assert folders.class_order(sorted(data.CIFAR10_CLASSES, reverse=True)) == list(data.CIFAR10_CLASSES)


## --------------------------------------------------------------------------------------------------------
## Report 3 and its kind: every file decoded to the picture a viewer shows, or refused with the reason.

ORIENTED = {  # EXIF orientation -> how the stored pixels are made from the upright picture (the EXIF/TIFF spec)
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, 1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt, kw", [("png", {}), ("tiff", {}), ("webp", {"lossless": True})])
def test_every_exif_orientation_is_undone(tmp_path, fmt, kw, orientation):
    upright = picture(orientation, 10, 6)  # a portrait: a turn shows in the shape, a mirror in the pixels
    stored = np.ascontiguousarray(ORIENTED[orientation](upright))
    Image.fromarray(stored).save(tmp_path / f"x.{fmt}", exif=exif_orientation(orientation), **kw)
    a, notes = read_image(tmp_path / f"x.{fmt}")
    assert np.array_equal(a, upright)
    assert ("turned upright by the EXIF orientation" in notes) == (orientation != 1)


def test_sideways_portrait_jpeg_is_read_upright(tmp_path):
    """Report 3: a JPEG stored sideways with orientation 6 is shown turned 90 degrees clockwise."""
    Image.fromarray(np.rot90(picture(5, 64, 32), 1).copy()).save(tmp_path / "p.jpg", quality=95,
                                                                 exif=exif_orientation(6))
    with Image.open(tmp_path / "p.jpg") as im:
        as_stored = np.asarray(im.convert("RGB"))  # the same JPEG decoder, orientation ignored: (32, 64, 3)
    a, _ = read_image(tmp_path / "p.jpg")
    assert a.shape == (64, 32, 3) and np.array_equal(a, np.rot90(as_stored, -1))
    # through a folder: a square image keeps every pixel, turned upright
    make_folder(tmp_path / "d", {"train": {"dog": 10}, "test": {"dog": 3}})
    turned = np.rot90(picture(6), 1).copy()
    for split, n in (("train", 10), ("test", 1)):
        (tmp_path / "d" / split / "cat").mkdir()
        for i in range(n):
            Image.fromarray(turned).save(tmp_path / "d" / split / "cat" / f"{i}.jpg", quality=95,
                                         exif=exif_orientation(6))
    with Image.open(tmp_path / "d" / "test" / "cat" / "0.jpg") as im:
        want = np.rot90(np.asarray(im.convert("RGB")), -1)
    d = data.one_class_data(source_of(tmp_path / "d"), "cat")
    assert np.array_equal(d.test[d.test_labels == NORMAL][0].permute(1, 2, 0).numpy(), want)
    assert "test: 1 image turned upright by the EXIF orientation (e.g. cat/0.jpg)" in d.notes


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_png16(path, a: np.ndarray):
    """A PNG with 16-bit samples: grey (H, W), or (H, W, C) grey+alpha, RGB or RGBA (Pillow writes none of these
    three itself)."""
    h, w = a.shape[:2]
    rows = b"".join(b"\0" + a[i].astype(">u2").tobytes() for i in range(h))
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[a.shape[2] if a.ndim == 3 else 1]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
                           + png_chunk(b"IEND", b""))


def s15(x: float) -> bytes:
    """ICC's s15Fixed16Number."""
    return struct.pack(">i", round(x * 65536))


def xyz(x, y, z) -> bytes:
    return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)


def desc(name: str) -> bytes:
    text = name.encode() + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 3 + 67)  # no Unicode, no Mac name


def linear_srgb_profile() -> bytes:
    """A minimal ICC v2 display profile: sRGB's primaries and white point, but linear tone curves (gamma 1)."""
    tags = [(b"desc", desc("linear sRGB")), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(0.4360747, 0.2225045, 0.0139322)),
            (b"gXYZ", xyz(0.3850649, 0.7168786, 0.0971045)), (b"bXYZ", xyz(0.1430804, 0.0606169, 0.7141733))]
    tags += [(t, b"curv" + bytes(4) + struct.pack(">IH", 1, 256)) for t in (b"rTRC", b"gTRC", b"bTRC")]
    return icc_file(b"mntrRGB XYZ ", tags)


def cmyk_grey_profile() -> bytes:
    """A minimal ICC v2 CMYK profile: an 8-bit table (2 points a side) giving L* = 100 (1 - K), a* = b* = 0,
    whatever C, M and Y are: far from Pillow's plain CMYK formula, so its use shows."""
    ramp = bytes(range(256))
    corners = b"".join(bytes([255 * (1 - k), 128, 128]) for _ in range(8) for k in (0, 1))  # C, M, Y, K order
    lut = (b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
           + ramp * 4 + corners + ramp * 3)  # lut8Type: input tables, grid (L*, a*, b* as bytes), output tables
    return icc_file(b"prtrCMYKLab ", [(b"desc", desc("grey by K")), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
                                      (b"A2B0", lut)])


def icc_file(kinds: bytes, tags: list) -> bytes:
    """An ICC v2 profile: 128-byte header (device class, colour space, connection space), tag table, tags."""
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, tag in tags:
        tag += bytes(-len(tag) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(tag))
        body += tag
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + kinds + bytes(12)
              + b"acsp" + bytes(28) + xyz(0.9642, 1.0, 0.8249)[8:] + bytes(48))  # D50 illuminant
    return header + struct.pack(">I", len(tags)) + table + body


def on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A transparent picture as a white page shows it: c * a + 255 * (1 - a), rounded; colour (H, W, C)."""
    c, a = colour.astype(np.uint32), alpha.astype(np.uint32)[..., None]
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def grey3(a):
    return np.repeat(a[..., None], 3, axis=2)


def srgb_of_luminance(y: np.ndarray) -> np.ndarray:
    """Linear light 0..1 -> 8-bit sRGB (the sRGB curve, IEC 61966-2-1)."""
    return np.round(np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055) * 255).astype(np.uint8)


def srgb_of_lightness(lightness: np.ndarray) -> np.ndarray:
    """CIE L* (0..100) of a neutral grey -> 8-bit sRGB."""
    return srgb_of_luminance(np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3))


TRANSPARENT = "with transparent pixels: shown on white"
SIXTEEN = "with 16-bit samples: shown as their top 8 bits"
FIRST = "shown by their first frame (animated or multi-page)"


def case(kind, p: Path):
    """Write one file of `kind` at p; returns (the picture a viewer shows, the note expected or None)."""
    rng = np.random.default_rng(7)
    rgb, v16 = picture(7), rng.integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
    if kind == "palette_transparent.png":
        index = rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8)
        colours = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [90, 90, 90]], dtype=np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette(colours.ravel().tolist())
        im.save(p, transparency=3)
        want = colours[index]
        want[index == 3] = 255
        return want, TRANSPARENT
    if kind == "rgba.png":
        alpha = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        alpha[0, :3] = (0, 255, 128)
        Image.fromarray(np.dstack([rgb, alpha])).save(p)
        return on_white(rgb, alpha), TRANSPARENT
    if kind == "la.png":
        grey, alpha = rgb[..., 0], rgb[..., 1]
        Image.fromarray(np.dstack([grey, alpha]), "LA").save(p)
        return grey3(on_white(grey[..., None], alpha)[..., 0]), TRANSPARENT
    if kind == "rgb_colour_key.png":
        rgb[:4] = (1, 2, 3)
        Image.fromarray(rgb).save(p, transparency=(1, 2, 3))
        want = rgb.copy()
        want[:4] = 255
        return want, TRANSPARENT
    if kind == "grey_colour_key.png":
        grey = rgb[..., 0].copy()
        grey[grey == 7] = 8
        grey[:2] = 7
        Image.fromarray(grey).save(p, transparency=7)
        want = grey3(grey)
        want[:2] = 255
        return want, TRANSPARENT
    if kind == "opaque_rgba.png":  # an alpha channel that is all 255 changes nothing and is not noted
        Image.fromarray(np.dstack([rgb, np.full((SIZE, SIZE), 255, np.uint8)])).save(p)
        return rgb, None
    if kind in ("grey16.png", "grey16.tiff"):  # Pillow's convert("RGB") clips these at 255: nearly all white
        Image.fromarray(v16).save(p)
        return grey3((v16 >> 8).astype(np.uint8)), SIXTEEN
    if kind == "grey16.pgm":
        p.write_bytes(f"P5 {SIZE} {SIZE} 65535\n".encode() + v16.astype(">u2").tobytes())
        return grey3((v16 >> 8).astype(np.uint8)), SIXTEEN
    if kind == "rgb48.png":
        v = rng.integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
        write_png16(p, v)
        return (v >> 8).astype(np.uint8), SIXTEEN
    if kind in ("rgba64.png", "la32.png"):  # 16-bit colour and alpha: top 8 bits of each, then on white
        v = rng.integers(0, 65536, (SIZE, SIZE, 4 if kind == "rgba64.png" else 2)).astype(np.uint16)
        write_png16(p, v)
        top = (v >> 8).astype(np.uint8)
        want = on_white(top[..., :-1], top[..., -1])
        return (want if kind == "rgba64.png" else grey3(want[..., 0])), SIXTEEN
    if kind == "float01.tiff":
        v = rng.random((SIZE, SIZE), dtype=np.float32)
        Image.fromarray(v).save(p)
        return grey3(np.round(v * 255).astype(np.uint8)), "with floating-point samples in 0..1: scaled to 0..255"
    if kind == "bilevel.png":
        bits = rng.random((SIZE, SIZE)) < 0.5
        Image.fromarray(bits).save(p)
        return grey3(bits.astype(np.uint8) * 255), None
    if kind == "grey.png":
        Image.fromarray(rgb[..., 2]).save(p)
        return grey3(rgb[..., 2]), None
    if kind == "animated.gif":  # the first frame, as a viewer shows it before it animates
        frames = [Image.fromarray(np.full((SIZE, SIZE, 3), c, np.uint8)) for c in ((250, 0, 0), (0, 0, 250))]
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return np.full((SIZE, SIZE, 3), (250, 0, 0), np.uint8), FIRST
    if kind == "pages.tiff":
        pages = [Image.fromarray(rgb), Image.fromarray(rgb[::-1].copy())]
        pages[0].save(p, save_all=True, append_images=pages[1:])
        return rgb, FIRST
    if kind == "cmyk.tiff":
        cmyk = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
        Image.fromarray(cmyk, "CMYK").save(p)
        c, k = cmyk[..., :3] / 255, cmyk[..., 3:] / 255
        return (np.round(255 * (1 - c) * (1 - k)).astype(np.uint8),
                "in CMYK without a usable colour profile: converted by Pillow's plain formula")
    if kind == "ycbcr.tiff":  # JPEG's full-range YCbCr (JFIF)
        ycc = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(ycc, "YCbCr").save(p)
        y, cb, cr = (ycc[..., i].astype(float) for i in range(3))
        want = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], axis=-1)
        return np.clip(np.round(want), 0, 255).astype(np.uint8), None
    if kind == "lab_greys.tiff":  # CIE L*a*b* with a* = b* = 0: neutral greys of lightness L*
        lab = np.zeros((SIZE, SIZE, 3), np.uint8)
        lab[..., 0] = np.linspace(0, 255, SIZE * SIZE).reshape(SIZE, SIZE).round()
        Image.fromarray(lab, "LAB").save(p)
        return grey3(srgb_of_lightness(lab[..., 0] / 255 * 100)), "in CIE L*a*b*: converted to sRGB"
    if kind == "srgb_profile.png":  # an sRGB profile on sRGB pixels changes nothing, and is not noted
        Image.fromarray(rgb).save(p, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
        return rgb, None
    if kind == "profile_of_another_kind.png":  # an RGB profile on grey pixels: ignored, as viewers ignore it
        Image.fromarray(rgb[..., 0]).save(p, icc_profile=linear_srgb_profile())
        return grey3(rgb[..., 0]), "with a colour profile that cannot be used ("  # littlecms's words follow
    if kind == "palette_profile.png":  # a palette's colours go through the profile too
        index = (np.arange(SIZE * SIZE) % 4).reshape(SIZE, SIZE).astype(np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette([0, 0, 0, 60, 60, 60, 128, 128, 128, 255, 255, 255])
        im.save(p, icc_profile=linear_srgb_profile())
        return (grey3(srgb_of_luminance(np.array([0, 60, 128, 255])[index] / 255)),
                "converted to sRGB by the embedded colour profile")
    if kind == "bilevel_transparent.png":
        bits = rng.random((SIZE, SIZE)) < 0.5
        Image.fromarray(bits).save(p, transparency=0)
        return grey3(np.full((SIZE, SIZE), 255, np.uint8)), TRANSPARENT
    if kind == "cmyk_profile.tiff":  # CMYK with its ICC profile: a viewer shows what the profile says
        cmyk = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
        Image.fromarray(cmyk, "CMYK").save(p, icc_profile=cmyk_grey_profile())
        return grey3(srgb_of_lightness(100 * (1 - cmyk[..., 3] / 255))), "converted to sRGB by the embedded colour " \
                                                                        "profile"
    if kind == "linear_profile.png":  # linear-light RGB with its ICC profile: a viewer shows it in sRGB
        v = np.arange(SIZE * SIZE * 3).reshape(SIZE, SIZE, 3) % 256
        Image.fromarray(v.astype(np.uint8)).save(p, icc_profile=linear_srgb_profile())
        return srgb_of_luminance(v / 255), "converted to sRGB by the embedded colour profile"
    raise ValueError(kind)


KINDS = ["palette_transparent.png", "rgba.png", "la.png", "rgb_colour_key.png", "grey_colour_key.png",
         "opaque_rgba.png", "grey16.png", "grey16.tiff", "grey16.pgm", "rgb48.png", "rgba64.png", "la32.png",
         "float01.tiff", "bilevel.png",
         "grey.png", "bilevel_transparent.png", "animated.gif", "pages.tiff", "cmyk.tiff", "cmyk_profile.tiff",
         "ycbcr.tiff", "lab_greys.tiff", "linear_profile.png", "palette_profile.png", "srgb_profile.png",
         "profile_of_another_kind.png"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_file_reads_as_a_viewer_shows_it(tmp_path, kind):
    want, expected_note = case(kind, tmp_path / kind)
    a, notes = read_image(tmp_path / kind)
    assert a.dtype == np.uint8 and a.shape == want.shape
    # Pillow's and littlecms's integer rounding; the CMYK table holds L* in 8 bits (steps of 0.4)
    tolerance = {"cmyk.tiff": 1, "ycbcr.tiff": 1, "linear_profile.png": 1, "palette_profile.png": 1,
                 "cmyk_profile.tiff": 2, "lab_greys.tiff": 2}.get(kind, 0)
    assert np.abs(a.astype(int) - want.astype(int)).max() <= tolerance
    if kind in ("rgba64.png", "la32.png"):
        assert notes == [SIXTEEN, TRANSPARENT]
    elif expected_note and expected_note.endswith("("):  # the reason in brackets is the library's own words
        assert len(notes) == 1 and notes[0].startswith(expected_note) and notes[0].endswith("): shown without it")
    else:
        assert notes == ([expected_note] if expected_note else [])
    with Image.open(tmp_path / kind) as im:
        plain = np.asarray(im.convert("RGB")).astype(int)  # what a bare convert("RGB") gives
    if kind == "grey16.png":
        assert (plain == 255).mean() > 0.9  # white: what reading without the 16-bit rule would train on
    if kind in ("linear_profile.png", "cmyk_profile.tiff"):
        assert np.abs(plain - want).max() > 50  # the profile matters: without it the mid-tones are far darker


def test_a_16_bit_folder_is_not_trained_on_white(tmp_path):
    for split, n in (("train", 10), ("test", 2)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(picture(i)[..., 0].astype(np.uint16) * 257).save(tmp_path / split / name / f"{i}.png")
    d = data.one_class_data(source_of(tmp_path), "a")
    assert d.train.float().mean() < 200 and any("16-bit samples" in line for line in d.notes)
    assert np.array_equal(d.test[0, 0].numpy(), picture(0)[..., 0])  # 257 * v >> 8 == v


@pytest.mark.parametrize("kind, reason", [
    ("int32.tiff", "32-bit integer samples have no standard range to show"),
    ("float_wide.tiff", "floating-point samples from -2 to 3: viewers show 0..1 as black..white"),
    ("float_nan.tiff", "floating-point samples with NaN or infinity"),
    ("truncated.png", "Pillow cannot decode it: "),
    ("truncated.jpg", "Pillow cannot decode it: image file is truncated"),
    ("text.jpg", "not an image Pillow can identify"),
    ("empty.png", "not an image Pillow can identify"),
])
def test_files_that_cannot_be_shown_are_refused_with_the_reason(tmp_path, kind, reason):
    p = tmp_path / kind
    v = np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    if kind == "int32.tiff":
        Image.fromarray((v * 100000).astype(np.int32)).save(p)
    elif kind == "float_wide.tiff":
        Image.fromarray(np.linspace(-2, 3, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)).save(p)
    elif kind == "float_nan.tiff":
        v[3, 3] = np.nan
        Image.fromarray(v).save(p)
    elif kind.startswith("truncated"):
        Image.fromarray(picture(1, 64, 64)).save(p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind == "text.jpg":
        p.write_text("<html>not found</html>")
    else:
        p.write_bytes(b"")
    with pytest.raises(UnreadableImage, match=reason.replace(".", r"\.")):
        read_image(p)


def test_decompression_bomb_is_named_with_its_size(tmp_path, monkeypatch):
    """A 14000 x 14000 PNG (196 megapixels) is over Pillow's limit (2 x 89.5): left out with that reason."""
    Image.new("1", (14000, 14000)).save(tmp_path / "big.png")  # 1-bit zeros: a small file, 25 MB in memory
    with pytest.raises(UnreadableImage, match=r"14000x14000 = 196 megapixels is over Pillow's "
                                                   r"decompression-bomb limit of 179 megapixels"):
        read_image(tmp_path / "big.png")
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's own limit, left as it was
    # between once and twice the limit Pillow only warns and reads it: so does read_image, without the warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    Image.fromarray(picture(3)).save(tmp_path / "256px.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, _ = read_image(tmp_path / "256px.png")
    assert np.array_equal(a, picture(3))


def test_left_out_images_are_named_with_reasons_in_a_bounded_line(tmp_path, capsys):
    make_folder(tmp_path, {"train": {"a": 20, "b": 20}, "test": {"a": 3, "b": 3}})
    for i in range(8):
        (tmp_path / "train" / "a" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    (tmp_path / "test" / "a" / "cut.png").write_bytes((tmp_path / "test" / "a" / "0.png").read_bytes()[:300])
    source = source_of(tmp_path)
    capsys.readouterr()
    d = data.one_class_data(source, "a", seed=0)
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "train: skipped" in x)
    assert "train: skipped 8 unreadable image files: a/bad0.png (not an image Pillow can identify" in line
    assert line.endswith(" and 3 more (the split was drawn with them listed; delete or repair them for the split "
                         "without them)")  # five names, then a count: a bounded line
    assert "test: skipped 1 unreadable image file: a/cut.png (Pillow cannot decode it: " in err
    assert sorted(Path(p).name for p, _ in d.left_out) == [f"bad{i}.png" for i in range(8)] + ["cut.png"]
    assert len(d.train) + (d.val_labels == NORMAL).sum() == 20 and (d.test_labels == NORMAL).sum() == 3
    again = data.one_class_data(source, "b", seed=0)  # meets test/a/cut.png again, as an anomaly
    assert "unreadable" not in capsys.readouterr().err  # named once per source ...
    assert str(tmp_path / "test" / "a" / "cut.png") in {p for p, _ in again.left_out}  # ... and in each record


def test_images_of_other_shapes_and_sizes_are_squared_visibly(tmp_path, capsys):
    make_folder(tmp_path, {"train": {"a": 10, "b": 10}, "test": {"a": 2, "b": 2}})
    wide = picture(50, 20, 40)
    Image.fromarray(wide).save(tmp_path / "test" / "b" / "wide.png")
    Image.fromarray(picture(51, 80, 80)).save(tmp_path / "test" / "b" / "big.png")
    source = source_of(tmp_path)
    capsys.readouterr()
    d = data.one_class_data(source, "a")
    err = capsys.readouterr().err
    assert d.test.shape[1:] == (3, SIZE, SIZE) and d.train.shape[1:] == (3, SIZE, SIZE)  # the most common size
    assert "test: 1 image not square: resized to 37 px on the shorter side and center-cropped (e.g. b/wide.png)" in err
    assert "test: 1 image larger than 37x37: resized to it (e.g. b/big.png)" in err
    assert f"test: images of several sizes: 2 of 37x37 resized to {SIZE}x{SIZE}, the most common size here" in err
    i = d.test_files.index(str(tmp_path / "test" / "b" / "wide.png"))
    want = Image.fromarray(wide).resize((74, 37), Image.BILINEAR).crop((18, 0, 55, 37))
    want = want.resize((SIZE, SIZE), Image.BILINEAR)
    assert np.array_equal(d.test[i].permute(1, 2, 0).numpy(), np.asarray(want))


def test_an_empty_file_changes_no_split_and_is_named(tmp_path, capsys):
    import shutil

    from helpers import image_folder
    clean = Path(image_folder(tmp_path / "clean"))
    junk = tmp_path / "junk"
    shutil.copytree(clean, junk)
    for where in ("train/ant/000a.png", "train/bee/015a.png", "test/cow/003a.png"):  # a failed copy, 0 bytes
        (junk / where).write_bytes(b"")

    def split(root):
        d = data.one_class_data(folders.open_source(root, image_size=32), "bee", seed=0, limit=20)
        return [[str(Path(p).relative_to(root)) for p in files] for files in (d.train_files, d.val_files,
                                                                             d.test_files)]
    assert split(junk) == split(clean)  # the same images in every part, as if the empty files were not there
    err = capsys.readouterr().err
    assert "train: skipped 2 files that are not images" in err and "000a.png (an empty file (0 bytes))" in err
    assert "test: skipped 1 file that is not an image" in err
