"""Data for OOD evaluation: every data SPEC of `ncguard.data`, synthetic OOD sets, and shape fitting.

Extra SPEC forms, built from the in-distribution data so they need no download:
- `noise:uniform`: uniform values in [0, 1), shaped like the ID inputs.
- `noise:gaussian`: Gaussian values with the ID data's mean and standard deviation (per channel
  for images, per feature for vectors), clipped to the ID data's range.
- `inverted:SPEC`: 1 - x of another SPEC whose values lie in [0, 1] (images: a negative).
Noise sets hold as many inputs as the ID set (at most `MAX_NOISE_ROWS`) and are seeded, so an
evaluation is repeatable.

Shapes: an OOD image set whose shape differs from the model's is converted (documented resize):
RGB to grayscale with the ITU-R 601 luma weights Pillow uses, grayscale to RGB by repeating the
channel, then a bilinear resize with Pillow. Vector inputs of another width cannot be converted
and give a DataError.
"""

from __future__ import annotations

import numpy as np

from .data import Dataset, load_dataset
from .errors import DataError

NOISE_PREFIX = "noise:"
INVERTED_PREFIX = "inverted:"
NOISE_KINDS = ("uniform", "gaussian")
MAX_NOISE_ROWS = 10_000
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as PIL's convert("L")
SYNTHETIC_FORMS = "noise:uniform, noise:gaussian, inverted:SPEC"


def _single_class(x: np.ndarray, name: str, input_scale: float) -> Dataset:
    """OOD inputs carry no real labels: one placeholder class named after the set."""
    return Dataset(x=x, y=np.zeros(len(x), dtype=np.int64), classes=(name,), name=name, input_scale=input_scale)


def noise_dataset(kind: str, like: Dataset, seed: int = 0) -> Dataset:
    """`noise:uniform` or `noise:gaussian` shaped like (and, for gaussian, moment-matched to) `like`."""
    if kind not in NOISE_KINDS:
        raise DataError(f"unknown noise kind {kind!r}: write noise:{' or noise:'.join(NOISE_KINDS)}")
    rng = np.random.default_rng(seed)
    shape = (min(len(like), MAX_NOISE_ROWS), *like.input_shape)
    if kind == "uniform":
        x = rng.random(shape, dtype=np.float32)
    else:
        axes = (0, 2, 3) if like.x.ndim == 4 else (0,)
        mean = like.x.mean(axis=axes, dtype=np.float64, keepdims=True)
        std = like.x.std(axis=axes, dtype=np.float64, keepdims=True)
        x = np.clip(mean[0] + std[0] * rng.standard_normal(shape), like.x.min(), like.x.max()).astype(np.float32)
    return _single_class(x, f"{NOISE_PREFIX}{kind}", like.input_scale)


def inverted_dataset(source: Dataset) -> Dataset:
    """1 - x, for data whose values lie in [0, 1] (readers scale images to that range)."""
    low, high = float(source.x.min()), float(source.x.max())
    if low < 0.0 or high > 1.0:
        raise DataError(f"inverted:{source.name} needs values in [0, 1] (images), but they range from {low:.3g} to {high:.3g}")
    return Dataset(
        x=np.subtract(np.float32(1.0), source.x, dtype=np.float32),
        y=source.y,
        classes=source.classes,
        name=f"{INVERTED_PREFIX}{source.name}",
        input_scale=source.input_scale,
    )


def load_ood_dataset(spec: str, like: Dataset, seed: int = 0) -> Dataset:
    """Read an OOD data SPEC: any `load_dataset` SPEC or a synthetic form (module docstring)."""
    if spec.startswith(NOISE_PREFIX):
        return noise_dataset(spec[len(NOISE_PREFIX):], like, seed)
    if spec.startswith(INVERTED_PREFIX):
        inner = spec[len(INVERTED_PREFIX):]
        if not inner:
            raise DataError("inverted: needs a data SPEC after the colon, e.g. inverted:digits:test")
        return inverted_dataset(load_ood_dataset(inner, like, seed))
    return load_dataset(spec)


def fit_to_shape(x: np.ndarray, input_shape: tuple[int, ...], what: str) -> np.ndarray:
    """`x` [N, ...] as [N, *input_shape]: images are converted and resized, vectors must already fit."""
    input_shape = tuple(int(d) for d in input_shape)
    if x.shape[1:] == input_shape:
        return x
    if x.ndim != 4 or len(input_shape) != 3 or input_shape[0] not in (1, 3) or x.shape[1] not in (1, 3):
        raise DataError(
            f"{what} has inputs of shape {list(x.shape[1:])} but the model takes {list(input_shape)}; "
            "only images ([channels, height, width] with 1 or 3 channels) can be converted"
        )
    channels, height, width = input_shape
    if x.shape[1] != channels:
        x = np.repeat(x, 3, axis=1) if channels == 3 else np.tensordot(x, LUMA_WEIGHTS, axes=([1], [0]))[:, None]
    if x.shape[2:] != (height, width):
        x = _resize(x.astype(np.float32, copy=False), height, width)
    return np.ascontiguousarray(x, dtype=np.float32)


def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of every channel with Pillow's float ("F") images, as decode_image resizes files."""
    from PIL import Image

    out = np.empty((*x.shape[:2], height, width), dtype=np.float32)
    for index in np.ndindex(*x.shape[:2]):
        plane = Image.fromarray(np.ascontiguousarray(x[index])).resize((width, height), Image.Resampling.BILINEAR)
        out[index] = np.asarray(plane, dtype=np.float32)
    return out
