"""Crafted request bodies are refused with a 4xx (`Rejected`), never an exception that would be a
5xx: the .npy headers and JSON bodies the issue-14 fuzz found, hypothesis strategies around them,
the bound on JSON values checked before json.loads builds anything, and the per-request pixel
budget of /predict_image. Parsing runs on a tiny real ncguard model file (no server needed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ncguard.client import npy_body
from ncguard.runtime import Predictor
from serving import settings as s
from serving.validation import (
    Rejected,
    decode_images,
    json_value_bound,
    json_value_count,
    parse_json_inputs,
    parse_npy_inputs,
)
from tests.conftest import SERVER_LIMITS
from tests.image_bytes import png_bytes
from tests.tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (1, 8, 8)
MAX_INPUTS = 16


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor(write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", SHAPE), provider="cpu")


def npy_with_header(header: str, payload: bytes = b"", major: int = 1) -> bytes:
    """A .npy body with a hand-written header, padded as numpy pads it."""
    text = header.encode("utf-8") if major == 3 else header.encode("latin1", errors="replace")
    size_bytes = 2 if major == 1 else 4
    pad = 64 - (8 + size_bytes + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes([major, 0]) + len(text).to_bytes(size_bytes, "little") + text + payload


def header(descr="'<f4'", shape="(1, 1, 8, 8)", fortran="False") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"


def refused(parse, body, predictor, max_inputs=MAX_INPUTS) -> Rejected:
    with pytest.raises(Rejected) as caught:
        parse(body, predictor, max_inputs)
    assert 400 <= caught.value.status < 500 and caught.value.reason and str(caught.value)
    assert len(str(caught.value)) < 1000, "a crafted value must not make a huge error message"
    return caught.value


# ---------------------------------------------------------------------- the issue's .npy headers


ISSUE_NPY_HEADERS = [
    # (what, header, payload, reason)
    ("descr np.dtype refuses with SyntaxError", header(descr="'f4,(2,3'"), b"\0" * 256, "wrong_dtype"),
    ("descr np.dtype refuses with ValueError", header(descr="'(100000000000,)f4'"), b"\0" * 256, "wrong_dtype"),
    ("subarray descr", header(descr="'(2,)f4'", shape="(1, 1, 8, 4)"), b"\0" * 256, "wrong_dtype"),
    ("structured descr", header(descr="'f4,f4'", shape="(1, 1, 8, 4)"), b"\0" * 256, "wrong_dtype"),
    ("list descr", header(descr="[('a', '<f4')]"), b"\0" * 256, "wrong_dtype"),
    ("zero-size with a dimension past int64", header(shape="(0, 9223372036854775808, 8, 8)"), b"", "wrong_shape"),
    ("zero-size with a huge middle dimension", header(shape="(0, 1, 10**30, 8)".replace("10**30", str(10**30))), b"", "wrong_shape"),
    ("65 dimensions, all 0", header(shape=repr((0,) * 65)), b"", "wrong_shape"),
    ("65 dimensions, all 1", header(shape=repr((1,) * 65)), b"\0" * 4, "wrong_shape"),
    ("3 dimensions", header(shape="(1, 64, 1)"), b"\0" * 256, "wrong_shape"),
    ("unhashable dict key", "{[]: 1}", b"", "malformed_npy"),
    ("set of lists", "{'descr': {1, [2]}}", b"", "malformed_npy"),
    ("4000-digit batch size", header(shape=f"({'9' * 4000}, 1, 8, 8)"), b"", "batch_too_large"),
    ("4000-digit sizes", header(shape=f"(1, 1, {'9' * 4000}, {'9' * 4000})"), b"", "malformed_npy"),
]


@pytest.mark.parametrize("what, text, payload, reason", ISSUE_NPY_HEADERS, ids=[c[0] for c in ISSUE_NPY_HEADERS])
def test_issue_npy_headers_are_refused_with_4xx(predictor, what, text, payload, reason):
    assert refused(parse_npy_inputs, npy_with_header(text, payload), predictor).reason == reason


def test_good_npy_bodies_still_parse(predictor):
    x = np.random.default_rng(0).uniform(0, 1, size=(3, *SHAPE)).astype(np.float32)
    np.testing.assert_array_equal(parse_npy_inputs(npy_body(x), predictor, MAX_INPUTS), x)
    assert parse_npy_inputs(npy_body(x[0]), predictor, MAX_INPUTS).shape == (1, *SHAPE)  # unbatched
    assert refused(parse_npy_inputs, npy_body(x[:0]), predictor).reason == "empty_batch"


# ---------------------------------------------------------------------- .npy headers, generated


sizes = st.one_of(st.integers(0, 9), st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, 10**30]))
shapes = st.one_of(
    st.lists(sizes, min_size=0, max_size=6).map(tuple),
    st.integers(60, 80).flatmap(lambda n: st.sampled_from([(0,) * n, (1,) * n, (0,) + (2**40,) * (n - 1)])),
    st.tuples(st.integers(0, 20), st.just(1), st.just(8), st.just(8)),  # the model's own shape
)
descrs = st.one_of(
    st.sampled_from(["<f4", ">f8", "|u1", "<i8", "<f2", "|b1", "<c8", "|O", "|V0", "|S0", "<M8", "f4,(2,3", "(100000000000,)f4",
                     "(2,)f4", "f4,f4", "(0,)f4", "((", "", "f" * 100]),
    st.text(max_size=20),
)
header_values = st.one_of(
    st.builds(lambda d, sh, f: {"descr": d, "fortran_order": f, "shape": sh}, descrs, shapes, st.booleans()),
    st.dictionaries(st.sampled_from(["descr", "fortran_order", "shape", "x"]), st.one_of(st.integers(), st.text(max_size=5), st.none(), shapes)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=header_values, payload_items=st.integers(0, 80), major=st.sampled_from([1, 2, 3]))
def test_generated_npy_headers_never_raise_anything_but_rejected(predictor, value, payload_items, major):
    body = npy_with_header(repr(value), b"\0" * (4 * payload_items), major=major)
    try:
        x = parse_npy_inputs(body, predictor, MAX_INPUTS)
    except Rejected as exc:
        assert 400 <= exc.status < 500
    else:
        assert x.dtype == np.float32 and x.shape[1:] == SHAPE and 1 <= len(x) <= MAX_INPUTS


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_header_text_is_refused_not_raised(predictor, text):
    refused(parse_npy_inputs, npy_with_header(text, b"\0" * 64), predictor)


# ---------------------------------------------------------------------- JSON shapes, generated


numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-10, 10))
json_leaves = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=3))
nested = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=5), max_leaves=60)
json_shapes = st.one_of(
    nested,
    st.lists(st.lists(st.lists(st.lists(numbers, min_size=8, max_size=8), min_size=8, max_size=8), min_size=1, max_size=1), max_size=4),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=json_shapes, wrap=st.booleans())
def test_generated_json_shapes_never_raise_anything_but_rejected(predictor, inputs, wrap):
    body = json.dumps({"inputs": inputs} if wrap else inputs).encode()
    try:
        x = parse_json_inputs(body, predictor, MAX_INPUTS)
    except Rejected as exc:
        assert 400 <= exc.status < 500
    else:
        assert x.dtype == np.float32 and x.shape[1:] == SHAPE


# ---------------------------------------------------------------------- the bound on JSON values


def test_json_value_count_bounds_what_json_loads_builds():
    for document in ([], [[]], [1, 2, [3, [4, 5]]], {"inputs": [[1.0, 2.0], [3.0]], "b": {"c": [None, True]}}, "a,b:[c"):
        text = json.dumps(document).encode()

        def values(v):
            if isinstance(v, list):
                return 1 + sum(values(e) for e in v)
            if isinstance(v, dict):
                return 1 + sum(1 + values(e) for e in v.values())  # keys are values too
            return 1

        assert json_value_count(text) >= values(json.loads(text))


def test_a_full_valid_batch_fits_the_json_bound(predictor):
    x = np.random.default_rng(1).uniform(0, 1, size=(MAX_INPUTS, *SHAPE)).round(3)
    body = json.dumps({"inputs": x.tolist()}).encode()
    assert json_value_count(body) <= json_value_bound(SHAPE, MAX_INPUTS)
    assert parse_json_inputs(body, predictor, MAX_INPUTS).shape == (MAX_INPUTS, *SHAPE)
    unbatched = json.dumps({"inputs": x[0].tolist()}).encode()
    assert parse_json_inputs(unbatched, predictor, MAX_INPUTS).shape == (1, *SHAPE)


@pytest.mark.parametrize("filler", [b"[],", b"1e0,", b"{},", b'{"a":1},', b"[[[]]],"])
def test_json_bodies_with_more_values_than_a_batch_are_refused_before_parsing(predictor, filler):
    n = json_value_bound(SHAPE, MAX_INPUTS) + 10  # at least one counted byte per filler
    body = b'{"inputs": [' + filler * n + b"[]]}"
    exc = refused(parse_json_inputs, body, predictor)
    assert (exc.reason, exc.status) == ("batch_too_large", 413)
    assert "JSON values" in str(exc)


# What both measuring scripts start with: the tree on sys.path, the model loaded, an RSS reader
# (VmRSS / VmHWM of this process, in MB). argv: ROOT, MODEL, then each script's own arguments.
PARSE_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from ncguard.runtime import Predictor
    from serving.validation import Rejected, parse_json_inputs

    def rss_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024

    predictor = Predictor(sys.argv[2], provider="cpu")
    """
)

MEASURE = PARSE_IN_FRESH_PROCESS + textwrap.dedent(
    """
    filler = sys.argv[3].encode()
    size = int(sys.argv[4])
    body = b'{"inputs": [' + filler * ((size - 20) // len(filler)) + b'[]]}'
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    try:
        parse_json_inputs(body, predictor, 256)
        status = 200
    except Rejected as exc:
        status = exc.status
    seconds = time.perf_counter() - start
    print(json.dumps({"status": status, "seconds": seconds, "peak_growth_mb": rss_mb("VmHWM") - before,
                      "after_growth_mb": rss_mb("VmRSS") - before, "body_mb": len(body) / 2**20}))
    """
)


def measure_json_rss(model: Path, filler: str, size: int = 16 * 2**20) -> dict:
    """Peak and remaining RSS growth of one parse_json_inputs call, in a fresh process (VmHWM is per process)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), str(model), filler, str(size)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("filler", ["[],", "1e0,"])
def test_a_16mb_json_body_of_tiny_values_costs_little_memory(predictor, filler, tmp_path):
    """The issue measured +420 MB RSS and up to 4.8 s for one such body; now it is refused after a scan."""
    model = write_tiny_model(tmp_path / "m.onnx", SHAPE)
    result = measure_json_rss(model, filler)
    assert result["status"] == 413
    assert result["peak_growth_mb"] < 50, result  # the body itself is already resident before the call
    assert result["seconds"] < 1.0, result


@pytest.mark.parametrize("inputs, kind", [
    ([["a"] * 64], "strings"), ([[True] * 64], "booleans"), ([[None]], "nulls"), ([[{"a": 1}]], "objects"), ("a" * 1000, "strings"),
])
def test_non_numbers_are_refused_before_numpy_sees_them(predictor, inputs, kind):
    exc = refused(parse_json_inputs, json.dumps({"inputs": inputs}).encode(), predictor)
    assert (exc.reason, exc.status) == ("wrong_dtype", 422) and kind in str(exc) and "dtype" in str(exc)


STRINGS = PARSE_IN_FRESH_PROCESS + textwrap.dedent(
    """
    body = json.dumps({"inputs": [["x" * 100000] + ["a"] * 1000]}).encode()
    before = rss_mb("VmHWM")
    try:
        parse_json_inputs(body, predictor, 256)
    except Rejected as exc:
        print(json.dumps({"status": exc.status, "peak_growth_mb": rss_mb("VmHWM") - before}))
    """
)


def test_one_long_string_among_short_ones_costs_no_memory(tmp_path):
    """np.asarray would make it a '<U100000' array of 1001 elements: +380 MB from a 0.1 MB body."""
    model = write_tiny_model(tmp_path / "m.onnx", SHAPE)
    out = subprocess.run([sys.executable, "-c", STRINGS, str(ROOT), str(model)], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == 422 and result["peak_growth_mb"] < 20, result


# ---------------------------------------------------------------------- the per-request pixel budget


def test_request_pixel_budget_refuses_before_decoding(predictor):
    big = png_bytes(np.zeros((512, 512), np.uint8))
    files = [(f"f{i}.png", big) for i in range(5)]  # 5 * 262144 pixels
    exc = pytest.raises(Rejected, decode_images, files, predictor, max_inputs=MAX_INPUTS, max_pixels=512 * 512,
                        max_request_pixels=4 * 512 * 512).value
    assert (exc.reason, exc.status) == ("image_too_large", 413)
    assert "per request" in str(exc) and "image 5" in str(exc)
    x = decode_images(files[:4], predictor, max_inputs=MAX_INPUTS, max_pixels=512 * 512, max_request_pixels=4 * 512 * 512)
    assert x.shape == (4, *SHAPE)


def test_a_broken_image_after_the_budget_is_still_named_before_decoding(predictor):
    files = [("a.png", png_bytes(np.zeros((8, 8), np.uint8))), ("b.png", b"\x89PNG not really")]
    exc = pytest.raises(Rejected, decode_images, files, predictor, max_inputs=MAX_INPUTS, max_pixels=10**6).value
    assert exc.reason == "bad_image" and "image 2" in str(exc)


def test_request_pixel_setting_defaults_and_env():
    assert s.ServeSettings.from_env({}).max_request_pixels == s.DEFAULT_MAX_REQUEST_PIXELS
    assert s.ServeSettings.from_env({s.MAX_REQUEST_PIXELS_ENV: "1000"}).max_request_pixels == 1000
    # raising only the per-image cap keeps one image at that cap admissible
    raised = s.ServeSettings.from_env({s.MAX_IMAGE_PIXELS_ENV: str(8192 * 8192)})
    assert raised.max_request_pixels == 8192 * 8192
    with pytest.raises(Exception, match=s.MAX_REQUEST_PIXELS_ENV):
        s.ServeSettings.from_env({s.MAX_REQUEST_PIXELS_ENV: "0"})


# ---------------------------------------------------------------------- the real service


def test_the_real_service_answers_crafted_bodies_with_4xx(server):
    """The issue's fuzz findings through `ncguard serve`: every crafted .npy header and a body of
    empty lists within the body limit get a 4xx with an error message, and the server keeps serving."""
    import httpx

    assert tuple(server.model_info()["input_shape"]) == SHAPE, "the headers above are written for 8x8 digits"
    for what, text, payload, _ in ISSUE_NPY_HEADERS:
        answer = httpx.post(f"{server.url}/predict", content=npy_with_header(text, payload),
                            headers={"content-type": "application/x-npy"}, timeout=60)
        assert 400 <= answer.status_code < 500 and answer.json()["error"], (what, answer.status_code, answer.text)
    limit = int(SERVER_LIMITS["NCGUARD_MAX_BODY_BYTES"])
    body = b'{"inputs": [' + b"[]," * ((limit - 20) // 3) + b"[]]}"
    answer = httpx.post(f"{server.url}/predict", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 413 and "JSON values" in answer.json()["error"], answer.text
    assert server.predict(np.zeros((2, *SHAPE), np.float32)).class_index.shape == (2,)
