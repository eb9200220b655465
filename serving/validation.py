"""Turning request bodies into model inputs, or into a refusal that names the problem.

Array checks (dtype, shape, NaN/inf, empty) are `Predictor.check_input`'s; image decoding is
`ncguard.images`'. This module adds only what belongs to HTTP: JSON and .npy parsing, the field name,
the per-request limits, and a reason label for the rejection counter.

Why a binary body. Parsing `{"inputs": ...}` for 64 Fashion-MNIST images (50k floats) costs
several times what ONNX Runtime needs to score them; a .npy body (`np.save` bytes, Content-Type
application/x-npy) is read with no parsing at all: the header is checked against the body length
before anything is allocated, then the rows are a view of the request bytes.
"""

from __future__ import annotations

import ast
import json
import sys
from typing import Sequence

import numpy as np

from ncguard.errors import DataError
from ncguard.images import decode_image, image_info
from ncguard.runtime import Predictor

INPUTS_FIELD = "inputs"
NPY_CONTENT_TYPE = "application/x-npy"
NPY_MAGIC = b"\x93NUMPY"
NPY_MAX_HEADER = 64 * 1024  # numpy writes headers of a few hundred bytes; more is not a .npy of ours


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


def _npy_header(body: bytes) -> tuple[dict, int]:
    """The .npy header dict and the offset where the data starts (format versions 1, 2 and 3)."""
    if not body.startswith(NPY_MAGIC) or len(body) < 10:
        raise Rejected("malformed_npy", f"the body is not a .npy array (it must start with the .npy magic bytes, as np.save writes); Content-Type {NPY_CONTENT_TYPE} announced one", 400)
    major = body[6]
    if major == 1:
        length, start = int.from_bytes(body[8:10], "little"), 10
    elif major in (2, 3):
        if len(body) < 12:
            raise Rejected("malformed_npy", "the .npy body ends inside its header", 400)
        length, start = int.from_bytes(body[8:12], "little"), 12
    else:
        raise Rejected("malformed_npy", f"unsupported .npy format version {major} (1, 2 and 3 are read)", 400)
    if length > NPY_MAX_HEADER or start + length > len(body):
        raise Rejected("malformed_npy", "the .npy header is longer than the body or than any array header needs", 400)
    text = body[start : start + length].decode("utf-8" if major == 3 else "latin1", errors="replace")
    try:
        header = ast.literal_eval(text)  # what numpy itself uses: literals only, never code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        header = None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise Rejected("malformed_npy", "the .npy header is not the dict {'descr', 'fortran_order', 'shape'} that np.save writes", 400)
    return header, start + length


def parse_npy_inputs(body: bytes, predictor: Predictor, max_inputs: int) -> np.ndarray:
    """A .npy body (np.save of [N, *input_shape] numbers) -> float32 [N, *input_shape].

    Object (pickled) arrays are refused, and the declared shape must match the body's size
    exactly, so a forged header cannot make the service allocate more than the body it sent.
    """
    header, offset = _npy_header(body)
    shape, descr = header["shape"], header["descr"]
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise Rejected("malformed_npy", f"the .npy header's shape {shape!r} is not a tuple of sizes", 400)
    if not isinstance(header["fortran_order"], bool):
        raise Rejected("malformed_npy", "the .npy header's fortran_order is not True or False", 400)
    try:
        dtype = np.dtype(descr) if isinstance(descr, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "fiu" or dtype.hasobject or dtype.shape:
        raise Rejected("wrong_dtype", f"the .npy array must hold numbers (float32 is best), got dtype {descr!r}", 422)
    model_shape = predictor.input_shape
    if len(shape) == len(model_shape) + 1 and shape[0] > max_inputs:
        raise Rejected("batch_too_large", _too_many(shape[0], max_inputs), 413)
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if expected != len(body) - offset:
        raise Rejected("malformed_npy", f"the .npy header declares shape {list(shape)} of {dtype} ({expected} bytes) but the body carries {len(body) - offset} bytes after the header", 400)
    if expected == 0:  # frombuffer refuses an offset at the very end; check_array names the empty batch
        return check_array(np.zeros(shape, dtype=dtype), predictor, max_inputs)
    x = np.frombuffer(body, dtype=dtype, offset=offset).reshape(shape, order="F" if header["fortran_order"] else "C")
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
