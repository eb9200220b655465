"""Binary (.npy) request bodies for /predict and the direct path for full batches, on the real
service on 127.0.0.1: same answers as JSON and as the local Predictor, bad bodies are 4xx that
name the problem and are counted, and /metrics counts every scored row on both paths."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ncguard.client import NPY_CONTENT_TYPE, NcguardClient, npy_body
from ncguard.errors import DataError
from ncguard.runtime import Predictor
from serving.settings import DEFAULT_BATCH_SIZE
from serving.validation import Rejected, parse_npy_inputs
from tests.conftest import SERVER_LIMITS

MAX_INPUTS = int(SERVER_LIMITS["NCGUARD_MAX_BATCH_INPUTS"])


@pytest.fixture(scope="module")
def predictor(served_model_path) -> Predictor:
    return Predictor(served_model_path, provider="cpu")


def inputs(predictor: Predictor, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(n, *predictor.input_shape)).astype(np.float32)


def npy_with_header(header: str, payload: bytes = b"") -> bytes:
    """A version-1.0 .npy body with a hand-written header, padded as numpy pads it."""
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


def metric_sum(client: NcguardClient, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(client.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def post_npy(client: NcguardClient, body: bytes) -> httpx.Response:
    return httpx.post(f"{client.url}/predict", content=body, headers={"content-type": NPY_CONTENT_TYPE}, timeout=60)


# ---------------------------------------------------------------------- parsing, without a server


def test_npy_bodies_of_any_number_dtype_and_layout_read_as_float32(predictor):
    x = inputs(predictor, 5)
    for variant in (x, x.astype(np.float64), x.astype(">f4"), np.asfortranarray(x), (x * 255).astype(np.uint8)):
        parsed = parse_npy_inputs(npy_body(variant) if variant.flags.c_contiguous else _fortran_npy(variant), predictor, MAX_INPUTS)
        assert parsed.dtype == np.float32 and parsed.shape == x.shape
        np.testing.assert_array_equal(parsed, np.asarray(variant, dtype=np.float32))
    one = parse_npy_inputs(npy_body(x[0]), predictor, MAX_INPUTS)  # a single unbatched input
    assert one.shape == (1, *predictor.input_shape)


def _fortran_npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)  # np.save keeps Fortran order for an F-contiguous array
    return buffer.getvalue()


def bad_bodies(shape: tuple[int, ...]) -> list[tuple[str, bytes, str, int]]:
    """(what, body, reason, status) for bodies the service must refuse."""
    rng = np.random.default_rng(0)
    good = npy_body(rng.uniform(0, 1, size=(2, *shape)).astype(np.float32))
    zipped = io.BytesIO()
    np.savez(zipped, x=np.zeros((1, *shape), np.float32))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    nan = np.full((1, *shape), np.nan, np.float32)
    huge = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({10**12}, {', '.join(map(str, shape))}), }}"
    forged = f"{{'descr': '<f4', 'fortran_order': False, 'shape': (1, {', '.join(map(str, shape[:-1]))}, {10**12}), }}"
    return [
        ("JSON text", json.dumps({"inputs": [[0.0]]}).encode(), "malformed_npy", 400),
        ("empty body", b"", "malformed_npy", 400),
        ("an .npz archive", zipped.getvalue(), "malformed_npy", 400),
        ("truncated data", good[:-7], "malformed_npy", 400),
        ("extra data", good + b"\x00" * 4, "malformed_npy", 400),
        ("header cut short", good[:9], "malformed_npy", 400),
        ("code in the header", npy_with_header("{'descr': __import__('os').getcwd(), 'fortran_order': False, 'shape': (1,)}"), "malformed_npy", 400),
        ("header not a dict", npy_with_header("[1, 2, 3]"), "malformed_npy", 400),
        ("negative size", npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }"), "malformed_npy", 400),
        ("unknown version", b"\x93NUMPY\x09\x00" + good[8:], "malformed_npy", 400),
        ("forged huge last axis", npy_with_header(forged, b"\x00" * 16), "malformed_npy", 400),
        ("forged huge batch", npy_with_header(huge, b"\x00" * 16), "batch_too_large", 413),
        ("pickled objects", pickled.getvalue(), "wrong_dtype", 422),
        ("booleans", npy_body(np.zeros((1, *shape), bool)), "wrong_dtype", 422),
        ("complex numbers", npy_body(np.zeros((1, *shape), np.complex64)), "wrong_dtype", 422),
        ("wrong shape", npy_body(np.zeros((2, 3, 3), np.float32)), "wrong_shape", 422),
        ("NaN", npy_body(nan), "not_finite", 422),
        ("no rows", npy_body(np.zeros((0, *shape), np.float32)), "empty_batch", 422),
        ("too many rows", npy_body(np.zeros((MAX_INPUTS + 1, *shape), np.float32)), "batch_too_large", 413),
    ]


def test_bad_npy_bodies_are_refused_with_their_reason(predictor):
    for what, body, reason, status in bad_bodies(predictor.input_shape):
        with pytest.raises(Rejected) as caught:
            parse_npy_inputs(body, predictor, MAX_INPUTS)
        assert (caught.value.reason, caught.value.status) == (reason, status), what
        assert str(caught.value), what


# ---------------------------------------------------------------------- the real service


def test_npy_and_json_bodies_give_the_local_predictions_on_both_paths(server, predictor):
    assert MAX_INPUTS >= DEFAULT_BATCH_SIZE, "the test server must allow a full batch in one request"
    for n in (3, DEFAULT_BATCH_SIZE):  # through the batching queue, then the direct full-batch path
        x = inputs(predictor, n, seed=n)
        expected = predictor.predict(x)
        for wire in ("npy", "json"):
            answer = server.predict(x, wire=wire)
            np.testing.assert_array_equal(answer.class_index, expected.class_index)
            np.testing.assert_allclose(answer.ood_score, expected.ood_score, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(answer.confidence, expected.confidence, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(answer.is_ood, expected.is_ood)


def test_metrics_count_every_row_on_both_paths(server, predictor):
    model = server.model_info()["name"]
    before = metric_sum(server, "ncguard_predictions_total", model=model)
    for n in (5, DEFAULT_BATCH_SIZE, 1):
        assert post_npy(server, npy_body(inputs(predictor, n))).status_code == 200
    assert metric_sum(server, "ncguard_predictions_total", model=model) == before + 5 + DEFAULT_BATCH_SIZE + 1


def test_bad_npy_bodies_get_a_4xx_naming_the_problem_and_are_counted(server, predictor):
    model = server.model_info()["name"]
    cases = bad_bodies(predictor.input_shape)
    before = {reason: metric_sum(server, "ncguard_rejected_inputs_total", model=model, reason=reason) for _, _, reason, _ in cases}
    expected = dict.fromkeys(before, 0)
    for what, body, reason, status in cases:
        response = post_npy(server, body)
        assert response.status_code == status, (what, response.text)
        assert response.json()["error"], what
        expected[reason] += 1
    for reason, count in expected.items():
        assert metric_sum(server, "ncguard_rejected_inputs_total", model=model, reason=reason) == before[reason] + count, reason
    assert len(server.predict(inputs(predictor, 2)).labels) == 2  # and the server still answers


def test_client_refuses_unknown_wire_formats_and_non_numbers(server, predictor):
    with pytest.raises(DataError, match="wire format"):
        server.predict(inputs(predictor, 1), wire="xml")
    with pytest.raises(DataError, match="numbers"):
        server.predict(np.array([["a"]]))
