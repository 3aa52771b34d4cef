"""One image file as an image viewer shows it: upright, first frame, transparency on white, 8-bit sRGB.

Plumbing beside data.py: folders.py calls `read_image` for every file of an image folder, so that what the network
sees is what a person looking at the folder sees, or the file is left out and named with the reason.

    picture, notes = read_image("cat/0001.jpg")   # (H, W, 3) uint8 RGB, and what reading it took
"""
import io
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps


class UnreadableImage(Exception):
    """One image file that cannot be shown faithfully; str(e) is the reason, in one line."""


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
    if im.mode in SIXTEEN_BIT or (im.mode == "I" and declares_16_bits(im) and a.min() >= 0 and a.max() <= 65535):
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


def square(a: np.ndarray, side: int, whole: bool = False) -> tuple[np.ndarray, str | None]:
    """The stored form of one image (H, W, 3) -> (S, S, 3) by the recipe's geometry: square images up to `side` stay
    as they are (CIFAR-10 stays 32 px); others are resized (bilinear and antialiased, as torchvision's Resize)
    either as a whole to side x side, the aspect ratio not kept (whole=True: the recipes with crop_pct 1, MVTec AD's,
    as torchvision's Resize([s, s])), or to `side` on the shorter side and center-cropped to a square (the CIFAR-10
    recipes, whose crop comes next anyway). Returns the note on what was done."""
    h, w = a.shape[:2]
    if h == w and h <= side:
        return a, None
    if whole or h == w:
        what = (f"larger than {side}x{side}: resized to it" if h == w else
                f"not square: resized as a whole to {side}x{side}, as the recipe does (aspect ratio not kept)")
        return np.asarray(Image.fromarray(a).resize((side, side), Image.BILINEAR)), what
    s = side / min(h, w)
    size = (max(side, round(w * s)), max(side, round(h * s)))  # PIL sizes are (width, height)
    im = Image.fromarray(a).resize(size, Image.BILINEAR)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return np.asarray(im), f"not square: resized to {side} px on the shorter side and center-cropped"
