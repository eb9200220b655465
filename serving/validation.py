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
import functools
import json
import sys
from typing import Sequence

import numpy as np
import orjson

from ncguard.errors import DataError
from ncguard.images import decode_image, image_info
from ncguard.runtime import Predictor

from .settings import DEFAULT_MAX_REQUEST_PIXELS

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
    count = count if count < 10**15 else "over 10**15"  # a forged header's count can have thousands of digits
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


# Room in the JSON value bound for what a valid request may carry besides its numbers and lists
# (the object, its keys, a few extra fields); small next to any batch, large next to nothing.
JSON_VALUE_SLACK = 4096


def json_value_bound(input_shape: Sequence[int], max_inputs: int) -> int:
    """The most JSON values (numbers, lists, keys) a valid `{"inputs": ...}` request can hold:
    `max_inputs` nested lists of the input shape, plus JSON_VALUE_SLACK."""
    numbers, lists, run = 1, 1, 1
    for d in input_shape:
        numbers *= int(d)
    for d in input_shape[:-1]:
        run *= int(d)
        lists += run
    return max_inputs * (numbers + lists) + 1 + JSON_VALUE_SLACK


def json_value_count(body: bytes) -> int:
    """An upper bound on the objects (values and keys) json.loads would build from `body`, without
    building them.

    Every value in a JSON document is the document itself, the first element of an array (after
    its '['), an element after a ',' or an object member after a ':', and every key comes with a
    ':'; so 1 + ',' + '[' + 2 * ':' bounds them (commas and colons inside strings only make it
    larger, and UTF-16/32 text still has these bytes). bytes.count runs at memory speed: a 16 MiB
    body is counted in milliseconds, where json.loads of `[],[],...` builds ~5 million lists.
    """
    return 1 + body.count(b",") + body.count(b"[") + 2 * body.count(b":")


_NOT_PARSED = object()


def _fast_json(body: bytes):
    """orjson's parser: 5-7x faster than the standard library's on a batch of numbers (16 Fashion-MNIST
    images: 0.6 ms against 4.2 ms, the largest cost of a JSON request). Strict JSON only: NaN and
    Infinity, which Python's json accepts and the service refuses with a precise 422, fall back to it."""
    return orjson.loads(body)


def parse_json_inputs(body: bytes, predictor: Predictor, max_inputs: int) -> np.ndarray:
    """`{"inputs": [...]}` -> float32 [N, *input_shape].

    A body that holds more JSON values than any valid batch can is refused before json.loads
    runs (413, batch_too_large): Python objects cost 30-60 bytes per value of 2-4 body bytes, so
    parsing first would let one body of a few MB take hundreds of MB of the worker's memory.
    """
    expected = f"a list of arrays of shape [{', '.join(map(str, predictor.input_shape))}]"
    bound = json_value_bound(predictor.input_shape, max_inputs)
    if json_value_count(body) > bound:
        raise Rejected(
            "batch_too_large",
            f"the body holds more JSON values than a batch of at most {max_inputs} inputs of shape "
            f"[{', '.join(map(str, predictor.input_shape))}] can (at most {bound}); split it, or send .npy",
            413,
        )
    problem = None
    try:
        payload = _fast_json(body)
    except ValueError:  # not strict JSON (NaN, Infinity), or malformed: the standard parser says which
        payload = _NOT_PARSED
    try:
        if payload is _NOT_PARSED:
            payload = json.loads(body)
    except RecursionError:
        problem = "the body is JSON nested too deeply to read"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"the body is not valid JSON: {exc}"
    if problem is not None:
        # Raised outside the except clause so that it chains nothing: `from None` only hides the
        # context, and a JSONDecodeError keeps the whole decoded body (`.doc`, a second copy of up
        # to 16 MB) alive for as long as the refusal or a reference cycle through it lives.
        raise Rejected("malformed_json", problem, 400)
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
    found = _non_number(inputs)
    if found is not None:
        # refused before np.asarray: with strings it builds a '<U{longest}' array of n_values x
        # longest x 4 bytes (a 0.1 MB body of one 100k-character string and 1000 short ones: +380 MB)
        raise Rejected("wrong_dtype", f"'inputs' must be nested lists of numbers ({expected}); it holds {found}, not a number dtype")
    try:
        x = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise Rejected("wrong_shape", f"'inputs' is not a regular array ({expected}): {exc}") from None
    return check_array(x, predictor, max_inputs)


# Most clients send the same header again and again (one shape, one dtype). ast.literal_eval builds
# a set of nested functions that refer to each other on every call: reference cycles that only the
# garbage collector frees, about 15,000 objects a second at 1,500 requests a second, and the
# collections they caused stalled every connection at once. A header read once is reused; only
# headers of a normal size are kept, so the cache stays small (at most CACHED_HEADERS x 512 bytes).
CACHED_HEADERS = 256
CACHEABLE_HEADER_CHARS = 512


@functools.lru_cache(maxsize=CACHED_HEADERS)
def _cached_literal(text: str):
    return ast.literal_eval(text)


def _read_literal(text: str):
    if len(text) > CACHEABLE_HEADER_CHARS:
        return ast.literal_eval(text)
    value = _cached_literal(text)
    return dict(value) if isinstance(value, dict) else value  # callers get their own dict


_NUMBER_TYPES = frozenset((int, float))
_JSON_KINDS = {str: "strings", bool: "booleans", type(None): "nulls", dict: "objects"}


def _non_number(value) -> str | None:
    """What `value` holds besides numbers and lists ("strings", "booleans", ...), or None.

    Iterative (no recursion limit) and mostly at C speed: the innermost lists, which hold nearly
    all values, are checked with one set(map(type, row)); bounded by the JSON value bound.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is list:
            types = set(map(type, item))
            if types <= _NUMBER_TYPES:
                continue
            stray = types - _NUMBER_TYPES - {list}
            if stray:
                return _JSON_KINDS.get(next(iter(stray)), "values that are not numbers")
            stack.extend(item)
        elif kind not in _NUMBER_TYPES:
            return _JSON_KINDS.get(kind, "values that are not numbers")
    return None


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
        header = _read_literal(text)  # what numpy itself uses (ast.literal_eval): literals only, never code
    except Exception:  # noqa: BLE001 - ValueError, SyntaxError, TypeError ({[]: 1}), MemoryError, RecursionError...
        header = None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise Rejected("malformed_npy", "the .npy header is not the dict {'descr', 'fortran_order', 'shape'} that np.save writes", 400)
    return header, start + length


def _npy_dtype(descr) -> np.dtype | None:
    """The dtype a header's `descr` names, or None: np.dtype raises SyntaxError, ValueError,
    TypeError (and more) on crafted strings such as 'f4,(2,3' or '(100000000000,)f4', and any of
    them is the client's mistake, never the server's."""
    if not isinstance(descr, str) or len(descr) > 64:
        return None
    try:
        return np.dtype(descr)
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def parse_npy_inputs(body: bytes, predictor: Predictor, max_inputs: int) -> np.ndarray:
    """A .npy body (np.save of [N, *input_shape] numbers) -> float32 [N, *input_shape].

    Object (pickled) arrays are refused, and the declared shape must match the model's input
    shape and the body's size exactly, so a forged header cannot make the service allocate more
    than the body it sent. The shape is checked in plain Python integers before NumPy sees it:
    NumPy raises (rather than refusing politely) on more than 64 dimensions or on a dimension
    beyond its index type, even when another dimension is 0 and the array would be empty.
    """
    header, offset = _npy_header(body)
    shape, descr = header["shape"], header["descr"]
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise Rejected("malformed_npy", f"the .npy header's shape {_shown(shape)} is not a tuple of sizes", 400)
    if not isinstance(header["fortran_order"], bool):
        raise Rejected("malformed_npy", "the .npy header's fortran_order is not True or False", 400)
    dtype = _npy_dtype(descr)
    if dtype is None or dtype.kind not in "fiu" or dtype.hasobject or dtype.shape or dtype.itemsize == 0:
        raise Rejected("wrong_dtype", f"the .npy array must hold numbers (float32 is best), got dtype {_shown(descr)}", 422)
    model_shape = tuple(predictor.input_shape)
    wanted = f"[N, {', '.join(map(str, model_shape))}]"
    if shape == model_shape:  # one unbatched input, as check_input also accepts
        shape = (1, *shape)
    if len(shape) != len(model_shape) + 1:
        raise Rejected("wrong_shape", f"inputs must have shape {wanted}, the .npy header declares {_shown(list(shape))}", 422)
    if shape[0] > max_inputs:
        raise Rejected("batch_too_large", _too_many(shape[0], max_inputs), 413)
    expected = _product(shape) * dtype.itemsize  # Python integers: no overflow, nothing allocated
    if expected != len(body) - offset:
        declared = f"{expected} bytes" if expected < 10**30 else "far more bytes than any body"
        raise Rejected("malformed_npy", f"the .npy header declares shape {_shown(list(shape))} of {dtype} ({declared}) but the body carries {len(body) - offset} bytes after the header", 400)
    if shape[1:] != model_shape:  # also catches (0, 2**63, ...): empty, yet beyond what NumPy can index
        raise Rejected("wrong_shape", f"inputs must have shape {wanted}, the .npy header declares {_shown(list(shape))}", 422)
    if expected == 0:  # frombuffer refuses an offset at the very end; check_array names the empty batch
        return check_array(np.zeros(shape, dtype=dtype), predictor, max_inputs)
    x = np.frombuffer(body, dtype=dtype, offset=offset).reshape(shape, order="F" if header["fortran_order"] else "C")
    return check_array(x, predictor, max_inputs)


def _product(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _shown(value, limit: int = 120) -> str:
    """repr of a client-sent value, cut short: a crafted header must not make a megabyte error
    message (and repr itself raises ValueError on an integer of more than 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return "(a value too large to show)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def decode_images(
    files: Sequence[tuple[str, bytes]],
    predictor: Predictor,
    *,
    max_inputs: int,
    max_pixels: int,
    max_request_pixels: int | None = None,
) -> np.ndarray:
    """PNG/JPEG files (name, bytes) -> float32 [N, C, H, W] in the model's layout.

    Every header is read before any image is decoded, so a request over its pixel budget
    (`max_request_pixels` for all images together, at least `max_pixels` when not given) is
    refused having cost a few header reads, not the decoding of the images before the one that
    tips it over.
    """
    channels, size = image_layout(predictor)
    budget = max(max_pixels, DEFAULT_MAX_REQUEST_PIXELS) if max_request_pixels is None else max_request_pixels
    if not files:
        raise Rejected("missing_field", "no image files in the request: send PNG/JPEG files as multipart/form-data (e.g. curl -F image=@photo.png)", 400)
    if len(files) > max_inputs:
        raise Rejected("batch_too_large", f"the request has {len(files)} images, more than the {max_inputs} allowed per request; split it", 413)
    total = 0
    for i, (name, data) in enumerate(files):
        which = f"image {i + 1} ({name!r})"
        try:
            # header only, with no size cap, so an oversized image is told apart from a broken one
            _, (height, width) = image_info(data, max_pixels=sys.maxsize)
        except DataError as exc:
            raise Rejected("bad_image", f"{which}: {exc}") from None
        if height * width > max_pixels:
            raise Rejected("image_too_large", f"{which} is {width}x{height} pixels, more than the {max_pixels} allowed", 413)
        total += height * width
        if total > budget:
            raise Rejected(
                "image_too_large",
                f"the images of this request hold more than the {budget} pixels allowed per request "
                f"(over it at {which}, {width}x{height}); send fewer or smaller images per request",
                413,
            )
    images = []
    for i, (name, data) in enumerate(files):
        try:
            images.append(decode_image(data, channels=channels, size=size, max_pixels=max_pixels))
        except DataError as exc:
            raise Rejected("bad_image", f"image {i + 1} ({name!r}): {exc}") from None
    return check_array(np.stack(images), predictor, max_inputs)
