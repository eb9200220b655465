"""Encoded images made in memory, for tests of image decoding and /predict_image."""

import io

import numpy as np
from PIL import Image


def png_bytes(pixels: np.ndarray, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save_args)
    return buffer.getvalue()
