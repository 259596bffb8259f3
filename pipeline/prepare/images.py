"""One image file to an array: Pillow's modes to 8-bit grey or RGB by rule, EXIF upright;
and what its header alone says (mode, upright size), read before any pixel is decoded."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline import PipelineError

_SAVE_AS = "save it as 8-bit grey or RGB (or 16-bit grey)"


def _grey(img: Image.Image, name: str) -> Image.Image:
    return img.convert("L")


def _rgb(img: Image.Image, name: str) -> Image.Image:
    # Transparency is dropped with the alpha channel; removing it first spares Pillow's warning.
    img.info.pop("transparency", None)
    return img.convert("RGB")


def _grey16(img: Image.Image, name: str) -> Image.Image:
    # Image.convert("L") clips (40000 -> 255); // 257 maps 0..65535 onto 0..255 exactly.
    return Image.fromarray((np.asarray(img) // 257).astype(np.uint8))


def _grey32(img: Image.Image, name: str) -> Image.Image:
    a = np.asarray(img)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise PipelineError(f"unreadable image {name}: Pillow mode 'I' (32-bit integer) with "
                            f"values in [{lo}, {hi}], outside the 16-bit range [0, 65535]; "
                            f"{_SAVE_AS}")
    return Image.fromarray((a // 257).astype(np.uint8))  # 16-bit grey (PGM, old Pillow PNG)


# Pillow mode of an opened file -> how it becomes 8-bit grey (L) or RGB. Alpha is dropped,
# not composited over a background; palette images become RGB (even with a grey palette);
# colour profiles are not applied; 16-bit grey is scaled by // 257 (65535 -> 255); 32-bit
# integer grey only where every value fits 16 bits. Every other mode (F, LAB, HSV,
# premultiplied La/RGBa, ...) is refused, naming the file. A data set is grey only when every
# image is; otherwise grey images are repeated into RGB (write_imagefolder).
IMAGE_MODES: dict[str, Callable[[Image.Image, str], Image.Image]] = {
    "1": _grey, "L": _grey, "LA": _grey,
    "I;16": _grey16, "I;16L": _grey16, "I;16B": _grey16, "I;16N": _grey16,
    "I": _grey32,
    "P": _rgb, "PA": _rgb,
    "RGB": _rgb, "RGBA": _rgb, "RGBX": _rgb, "CMYK": _rgb, "YCbCr": _rgb,
}


def to_grey_or_rgb(img: Image.Image, name: str) -> Image.Image:
    """``img`` upright (its EXIF orientation applied, as a photo viewer shows it) as 8-bit
    grey (mode L) or RGB by the rule of ``IMAGE_MODES``; else PipelineError. Only the first
    frame of an animated or multi-page file is read."""
    convert = IMAGE_MODES.get(img.mode)
    if convert is None:
        raise PipelineError(f"unreadable image {name}: Pillow mode {img.mode!r} is not "
                            f"supported; {_SAVE_AS}")
    return convert(ImageOps.exif_transpose(img), name)


def _open(name: str, raw: bytes) -> Image.Image:
    """``raw`` opened lazily (only the header read), or PipelineError naming the file."""
    if not raw:
        raise PipelineError(f"unreadable image {name}: the file is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        # Pillow's own message names the in-memory buffer, not the file.
        raise PipelineError(f"unreadable image {name}: not a format Pillow can read "
                            f"({len(raw)} bytes)") from None
    except OSError as e:
        raise PipelineError(f"unreadable image {name}: {e}") from None


def _decode(name: str, raw: bytes, resize: int | None) -> np.ndarray:
    """The pixels of one image file: (H, W) grey or (H, W, 3) RGB uint8, upright, and squashed
    to (resize, resize) with bilinear filtering when ``resize`` is set (aspect not kept)."""
    img = _open(name, raw)
    try:
        img.load()
    except OSError as e:
        raise PipelineError(f"unreadable image {name}: {e}") from None
    img = to_grey_or_rgb(img, name)
    if resize:
        img = img.resize((resize, resize), Image.BILINEAR)
    return np.asarray(img)


# The channels each mode becomes (the rule of IMAGE_MODES).
CHANNELS = {mode: 1 if convert in (_grey, _grey16, _grey32) else 3
            for mode, convert in IMAGE_MODES.items()}
# Where a PNG may keep an EXIF orientation: Pillow reads chunks after the pixel data only by
# decoding them, so the header pass decodes the few PNGs that name one of these.
_PNG_ORIENTATION_KEYS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


def header(name: str, raw: bytes) -> tuple[int, int, int]:
    """(height, width, channels) of the array :func:`_decode` will return (before resizing),
    read from the file's header; the pixels are not decoded. PipelineError as ``_decode``
    for an empty or unknown file or an unsupported mode."""
    img = _open(name, raw)
    if img.mode not in IMAGE_MODES:
        to_grey_or_rgb(img, name)  # raises, naming the mode
    width, height = img.size
    if img.format != "PNG" or any(key in raw for key in _PNG_ORIENTATION_KEYS):
        try:
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        except OSError as e:  # a PNG decoded for its trailing chunks, and found damaged
            raise PipelineError(f"unreadable image {name}: {e}") from None
        # Orientations 5-8 turn the image a quarter: its upright width is its stored height.
        if orientation in (5, 6, 7, 8):
            width, height = height, width
    return height, width, CHANNELS[img.mode]
