"""Decode PNG/JPEG files into the model's input layout: float32 [channels, height, width] in [0, 1].

Shared by the image-folder reader, `ncguard predict` and the service's /predict_image, so an
image scores the same whichever way it reaches the model.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, DataError

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]

# Only these are accepted: they are the formats the service documents, and refusing the
# rest keeps rarely used (and rarely hardened) Pillow decoders away from untrusted input.
FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Pillow modes that carry one intensity per pixel (with or without alpha).
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# 16-bit grayscale PNGs open in these modes; a plain convert("L") would clip them at 255.
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

DEFAULT_MAX_PIXELS = 4096 * 4096


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image data ({len(source)} bytes)"
    return f"image {os.fspath(source)!r}"


def _open(source: ImageSource, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse oversized images before any pixel is decoded."""
    what = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataError(f"{what}: no such file")
        fp = path
    else:
        raise DataError(f"cannot read an image from a {type(source).__name__}; pass bytes or a file path")
    try:
        image = Image.open(fp, formats=FORMATS)
    except UnidentifiedImageError:
        raise DataError(f"{what} is not a PNG or JPEG image (or is corrupt)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{what} is too large to decode safely: {exc}") from None
    except (OSError, ValueError) as exc:  # Pillow raises ValueError for some malformed headers ("Truncated IHDR chunk")
        raise DataError(f"{what} cannot be read: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DataError(f"{what} is {width}x{height} pixels, more than the {max_pixels} allowed")
    if width == 0 or height == 0:
        image.close()
        raise DataError(f"{what} has no pixels ({width}x{height})")
    return image


def image_info(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) from the header only: 1 channel for grayscale modes, else 3."""
    with _open(source, max_pixels) as image:
        channels = 1 if image.mode in _GRAYSCALE_MODES else 3
        width, height = image.size
    return channels, (height, width)


def _check_target(channels: int, size: tuple[int, int]) -> tuple[int, int]:
    if channels not in (1, 3):
        raise ConfigError(f"images can be decoded to 1 (grayscale) or 3 (RGB) channels, not {channels}")
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise ConfigError(f"image size must be positive, got {height}x{width} (height x width)")
    return height, width


def decode_image(
    data: ImageSource,
    *,
    channels: int,
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """PNG/JPEG bytes or file -> float32 [channels, height, width] with pixels / 255 in [0, 1].

    `size` is (height, width), the order of the model's input shape. The image is turned
    upright by its EXIF orientation, converted to L (channels=1) or RGB (channels=3; alpha is
    dropped) and resized bilinearly when its size differs.
    """
    height, width = _check_target(channels, size)
    what = _describe(data)
    with _open(data, max_pixels) as image:
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in _HIGH_BIT_DEPTH_MODES:
                # 16-bit samples -> 8-bit, the Pillow idiom: scale first, then convert (which clips).
                image = image.point(lambda v: v * (1 / 257)).convert("L")
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            # Truncated or corrupt pixel data only shows up here, after the header parsed fine.
            raise DataError(f"{what} cannot be decoded: {exc}") from None
    if channels == 1:
        pixels = pixels[np.newaxis, :, :]
    else:
        pixels = np.moveaxis(pixels, -1, 0)
    return np.divide(pixels, np.float32(255), dtype=np.float32)
