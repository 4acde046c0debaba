"""Decoding image files: the one decoder of ``gradcam-jax explain`` and ``explain-dir``.

:func:`load_image` turns any file Pillow opens into ``uint8`` RGB by one rule per mode:

=============================================  ================================================
mode                                           rule
=============================================  ================================================
``RGB``, ``L``, ``1``, ``P``, ``CMYK``,        Pillow's conversion to RGB (CMYK:
``YCbCr``, ``LAB``, ``HSV``, ``RGBX``          ``(255 - c) * (255 - k) / 255``)
``I;16``, ``I;16B``, ``I;16L``, ``I;16N``      16-bit grey: the high byte, ``v >> 8``, maps
                                               0-65535 onto 0-255 (16-bit RGB PNGs are read the
                                               same way by Pillow)
``I`` (32-bit integers)                        values within 0-65535 read as 16-bit (``v >> 8``);
                                               any other range stretched from the image's
                                               minimum (0) to its maximum (255)
``F`` (32-bit floats)                          values within [0, 1] times 255, rounded; any other
                                               range stretched from minimum to maximum; NaN or
                                               infinite values are refused
``LA``, ``RGBA``, ``PA``, ``RGBa``, ``P`` or   composited on a white background:
``L``/``RGB`` with a transparent colour        ``round((c * a + 255 * (255 - a)) / 255)``
=============================================  ================================================

The EXIF orientation is applied, an animation gives its first frame, colour profiles (ICC) are
not applied. Images smaller than :data:`MIN_SIDE` pixels on a side are refused (the same
message in both commands). A file that cannot be read raises :class:`RecordError` with the
reason, never another exception.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

__all__ = ["RecordError", "load_image", "to_rgb", "MIN_SIDE", "BACKGROUND"]

#: The smallest side (pixels) of an image the commands explain.
MIN_SIDE = 2
#: The grey level transparent pixels are composited on (white).
BACKGROUND = 255

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16BS", "I;16LS", "I;16S")
_WITH_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


class RecordError(Exception):
    """A record that cannot be turned into a model input (recorded in the store, skipped)."""


def _stretch(v: np.ndarray) -> np.ndarray:
    """``v`` linearly from its minimum (0) to its maximum (255); a constant image is black."""
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.rint((v.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_to_8_bits(v: np.ndarray, mode: str) -> np.ndarray:
    """One channel of a 16-bit, 32-bit integer or float image on the 0-255 scale (see the table)."""
    if mode in _SIXTEEN_BIT:
        return (v.astype(np.uint32) >> 8).astype(np.uint8)
    if mode == "F":
        if not np.isfinite(v).all():
            raise RecordError("a floating-point image with NaN or infinite values")
        if v.min() >= 0.0 and v.max() <= 1.0:
            return np.rint(v.astype(np.float64) * 255.0).astype(np.uint8)
        return _stretch(v)
    if v.min() >= 0 and v.max() <= 0xFFFF:  # mode I: how Pillow holds 16-bit PNM / TIFF data
        return (v.astype(np.uint32) >> 8).astype(np.uint8)
    return _stretch(v)


def _composite(rgba: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8 straight alpha -> ``(H, W, 3)`` on :data:`BACKGROUND` (exact rounding)."""
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:].astype(np.uint32)
    return ((c * a + BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


def _has_alpha(im: Any) -> bool:
    if im.mode in _WITH_ALPHA:
        return True
    return im.mode in ("P", "L", "RGB") and "transparency" in im.info


def to_rgb(im: Any) -> Any:
    """A loaded Pillow image as an ``RGB`` Pillow image, by the rules of the module's table."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        grey = _grey_to_8_bits(np.asarray(im), mode)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if _has_alpha(im):
        return Image.fromarray(_composite(np.asarray(im.convert("RGBA"))))
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise RecordError(f"an image of mode {mode!r}, which cannot be converted to RGB ({e})") from None


def _decode(im: Any, size: int | None) -> np.ndarray:
    from PIL import Image, ImageOps

    width, height = im.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise RecordError(
            f"image is only {width} x {height} pixels; at least {MIN_SIDE} x {MIN_SIDE} are needed"
        )
    if size is not None and im.format == "JPEG":
        # Decode a large JPEG at a reduced scale that is still >= size on both sides (the DCT
        # scaling of libjpeg): several times faster, and the antialiased resize below follows.
        im.draft("RGB", (size, size))
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im.load()
    im = to_rgb(ImageOps.exif_transpose(im))
    if size is not None and im.size != (size, size):
        # Pillow's bilinear filter widens with the reduction factor: antialiased, like
        # jax.image.resize(..., antialias=True) in the zoo's preprocess. Aspect ratio not kept.
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise RecordError(f"decoded to an unexpected shape {arr.shape}")
    return arr


def load_image(
    file: str | os.PathLike | bytes | bytearray | memoryview, size: int | None = 224
) -> np.ndarray:
    """Decode an image file (a path, or encoded bytes) to ``uint8`` RGB ``(size, size, 3)``.

    Every Pillow mode is converted by the rules of :mod:`gradcam_jax.dataset.images` (16-bit and
    float images scaled by their range, alpha composited on white, EXIF orientation applied).
    JPEGs are decoded at a reduced DCT scale when they are much larger than ``size``, then every
    image is resized with Pillow's antialiased bilinear filter (aspect ratio not kept).
    ``size=None`` keeps the decoded size.

    Raises:
      RecordError: the file cannot be read or decoded, or is smaller than 2 x 2; the message
        says why.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(file, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(file))) as im:
                return _decode(im, size)
        path = os.fspath(file)
        if os.path.isdir(path):
            raise RecordError("is a folder, not an image file")
        with Image.open(path) as im:
            return _decode(im, size)
    except RecordError:
        raise
    except FileNotFoundError:
        raise RecordError("no such file") from None
    except PermissionError:
        raise RecordError("permission denied") from None
    except UnidentifiedImageError:
        raise RecordError("not an image Pillow can read (unknown or damaged format)") from None
    except Image.DecompressionBombError as e:
        raise RecordError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        raise RecordError(f"damaged or truncated image ({type(e).__name__}: {e})") from None
    except Exception as e:  # a decoder bug must not stop a dataset run
        raise RecordError(f"cannot decode ({type(e).__name__}: {e})") from None
