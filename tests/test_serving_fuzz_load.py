"""Robustness of the real service: a bounded property-based fuzz run finds no 5xx (every refusal is
a counted 4xx with {"error": ...}), and a bounded concurrent load gets only 200s with each
request's own predictions back, although adaptive batching merges requests."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ncguard.runtime import Predictor
from tests.test_serving import rejected_counts

FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_leaves = st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.text(max_size=4)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=60,
)
number = st.floats(width=32) | st.integers(min_value=-1000, max_value=1000)
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "image/png", None])


@st.composite
def near_valid_arrays(draw, input_shape=(1, 8, 8)):
    """Nested lists whose shape is the model's, or off by an axis or a length, with any numbers."""
    shape = [draw(st.integers(0, 4)), *input_shape]
    edit = draw(st.sampled_from(["none", "drop", "add", "resize"]))
    if edit == "drop":
        del shape[draw(st.integers(0, len(shape) - 1))]
    elif edit == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
    elif edit == "resize":
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 9))
    size = int(np.prod(shape))
    values = draw(st.lists(number, min_size=size, max_size=size)) if size <= 2048 else [0.5] * size
    return np.array(values, dtype=object).reshape(shape).tolist() if shape else values


predict_bodies = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps({"inputs": v}).encode()),
    near_valid_arrays().map(lambda v: json.dumps({"inputs": v}).encode()),
)


def _valid_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(12, 10), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@st.composite
def damaged_pngs(draw):
    data = bytearray(_valid_png())
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


image_files = st.one_of(st.binary(max_size=512), damaged_pngs())


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def refusals(server):
    """Counts this module's 4xx answers; at the end they must equal the counter's increase."""
    seen = {"count": 0}
    before = sum(rejected_counts(server).values())
    yield seen
    assert sum(rejected_counts(server).values()) - before == seen["count"]


def _check_answer(response: httpx.Response, refusals: dict) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code >= 400:
        refusals["count"] += 1
        assert set(body) == {"error"} and body["error"], body
    else:
        assert response.status_code == 200
        assert set(body) == {"predictions", "model", "threshold"}


@FUZZ
@given(body=predict_bodies, content_type=content_types)
def test_fuzzed_predict_requests_never_get_a_5xx(http, refusals, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    _check_answer(http.post("/predict", content=body, headers=headers), refusals)


@FUZZ
@given(files=st.lists(st.tuples(st.text(max_size=8), image_files), max_size=4), raw=st.booleans(), content_type=content_types)
def test_fuzzed_image_requests_never_get_a_5xx(http, refusals, files, raw, content_type):
    if raw and files:
        response = http.post("/predict_image", content=files[0][1], headers={"content-type": content_type or "image/png"})
    else:
        response = http.post("/predict_image", files=[("image", (name or "f", data)) for name, data in files] or None, data={"x": "1"})
    _check_answer(response, refusals)


def test_concurrent_load_gets_only_200s_with_each_requests_own_answers(server, served_model_path, refusals):
    predictor = Predictor(served_model_path, provider="cpu")
    rng = np.random.default_rng(5)
    requests = [rng.uniform(0, 1, size=(int(rng.integers(1, 5)), *predictor.input_shape)).astype(np.float32) for _ in range(320)]

    def send(indices: range) -> list[tuple[int, int, dict]]:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            out = []
            for i in indices:
                response = client.post("/predict", json={"inputs": requests[i].tolist()})
                out.append((i, response.status_code, response.json()))
            return out

    clients = 8
    merged_before = _adaptive_batches(server.metrics())
    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(send, [range(k, len(requests), clients) for k in range(clients)]) for r in part]
    assert sorted(status for _, status, _ in results) == [200] * len(requests)
    # concurrent requests meet in the batching queue (serving.batcher): some ONNX Runtime calls
    # carried the rows of more than one request
    batches, rows = (after - before for after, before in zip(_adaptive_batches(server.metrics()), merged_before))
    assert batches > 0 and rows / batches > sum(len(r) for r in requests) / len(requests)
    for i, _, body in results:
        expected = predictor.predict(requests[i])
        assert [row["class_index"] for row in body["predictions"]] == expected.class_index.tolist()
        np.testing.assert_allclose([row["ood_score"] for row in body["predictions"]], expected.ood_score, rtol=1e-5, atol=1e-5)


def _adaptive_batches(metrics_text: str) -> tuple[float, float]:
    """(ONNX Runtime calls of the batching queue, rows they carried) from /metrics."""
    values = {"count": 0.0, "sum": 0.0}
    for line in metrics_text.splitlines():
        for key in values:
            if line.startswith(f"ncguard_batch_rows_{key}{{"):
                values[key] += float(line.rsplit(" ", 1)[1])
    return values["count"], values["sum"]
