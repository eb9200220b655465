"""Turning request bodies into model inputs, or into a refusal that names the problem.

Array checks (dtype, shape, NaN/inf, empty) are `Predictor.check_input`'s; image decoding is
`ncguard.images`'. This module adds only what belongs to HTTP: JSON parsing, the field name,
the per-request limits, and a reason label for the rejection counter.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

import numpy as np

from ncguard.errors import DataError
from ncguard.images import decode_image, image_info
from ncguard.runtime import Predictor

INPUTS_FIELD = "inputs"


class Rejected(DataError):
    """A request the service refuses: HTTP `status`, a `reason` label and a message for the client."""

    def __init__(self, reason: str, message: str, status: int = 422):
        super().__init__(message)
        self.reason = reason
        self.status = status


def _too_many(count: int, max_inputs: int) -> str:
    return f"the batch has {count} inputs, more than the {max_inputs} allowed per request; split it"


def check_array(x: np.ndarray, predictor: Predictor, max_inputs: int) -> np.ndarray:
    """float32 [N, *input_shape] ready for the model, or Rejected."""
    shape = predictor.input_shape
    if x.ndim == len(shape) + 1 and len(x) > max_inputs:
        raise Rejected("batch_too_large", _too_many(len(x), max_inputs), 413)
    try:
        return predictor.check_input(x)
    except DataError as exc:
        raise Rejected(exc.reason or "invalid_input", str(exc)) from None


def parse_json_inputs(body: bytes, predictor: Predictor, max_inputs: int) -> np.ndarray:
    """`{"inputs": [...]}` -> float32 [N, *input_shape]."""
    expected = f"a list of arrays of shape [{', '.join(map(str, predictor.input_shape))}]"
    try:
        payload = json.loads(body)
    except RecursionError:
        raise Rejected("malformed_json", "the body is JSON nested too deeply to read", 400) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Rejected("malformed_json", f"the body is not valid JSON: {exc}", 400) from None
    if not isinstance(payload, dict):
        raise Rejected("missing_field", f"the body must be a JSON object with a field {INPUTS_FIELD!r} ({expected})", 400)
    if INPUTS_FIELD not in payload:
        raise Rejected("missing_field", f"the body has no field {INPUTS_FIELD!r}: send {{\"{INPUTS_FIELD}\": {expected}}}", 400)
    inputs = payload[INPUTS_FIELD]
    if isinstance(inputs, list) and not inputs:
        raise Rejected("empty_batch", "the batch is empty: 'inputs' holds no arrays")
    if isinstance(inputs, list) and len(inputs) > max_inputs and len(inputs) != predictor.input_shape[0]:
        # refuse before building a large array (a list as long as the first input axis may be one
        # unbatched input; check_array decides that case exactly)
        raise Rejected("batch_too_large", _too_many(len(inputs), max_inputs), 413)
    try:
        x = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise Rejected("wrong_shape", f"'inputs' is not a regular array ({expected}): {exc}") from None
    return check_array(x, predictor, max_inputs)


def image_layout(predictor: Predictor) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of an image model, or Rejected for a model that takes vectors."""
    shape = predictor.input_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise Rejected(
            "wrong_shape",
            f"this model takes inputs of shape [{', '.join(map(str, shape))}], not images; send arrays to /predict",
            400,
        )
    return shape[0], (shape[1], shape[2])


def decode_images(files: Sequence[tuple[str, bytes]], predictor: Predictor, *, max_inputs: int, max_pixels: int) -> np.ndarray:
    """PNG/JPEG files (name, bytes) -> float32 [N, C, H, W] in the model's layout."""
    channels, size = image_layout(predictor)
    if not files:
        raise Rejected("missing_field", "no image files in the request: send PNG/JPEG files as multipart/form-data (e.g. curl -F image=@photo.png)", 400)
    if len(files) > max_inputs:
        raise Rejected("batch_too_large", f"the request has {len(files)} images, more than the {max_inputs} allowed per request; split it", 413)
    images = []
    for i, (name, data) in enumerate(files):
        which = f"image {i + 1} ({name!r})"
        try:
            # header only, with no size cap, so an oversized image is told apart from a broken one
            _, (height, width) = image_info(data, max_pixels=sys.maxsize)
        except DataError as exc:
            raise Rejected("bad_image", f"{which}: {exc}") from None
        if height * width > max_pixels:
            raise Rejected("image_too_large", f"{which} is {width}x{height} pixels, more than the {max_pixels} allowed", 413)
        try:
            images.append(decode_image(data, channels=channels, size=size, max_pixels=max_pixels))
        except DataError as exc:
            raise Rejected("bad_image", f"{which}: {exc}") from None
    return check_array(np.stack(images), predictor, max_inputs)
