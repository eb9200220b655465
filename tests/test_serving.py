"""The real service on 127.0.0.1: answers match the local Predictor, bad input gets a 4xx that names
the problem and is counted, and the server keeps answering (DESIGN.md section 3, "HTTP")."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ncguard.client import NcguardClient, ServiceError
from ncguard.data import load_dataset
from ncguard.errors import DataError
from ncguard.images import decode_image
from ncguard.model_file import load_model
from ncguard.runtime import Predictor
from tests.conftest import SERVER_LIMITS
from tests.image_bytes import png_bytes

MAX_INPUTS = int(SERVER_LIMITS["NCGUARD_MAX_BATCH_INPUTS"])
MAX_BODY = int(SERVER_LIMITS["NCGUARD_MAX_BODY_BYTES"])
MAX_PIXELS = int(SERVER_LIMITS["NCGUARD_MAX_IMAGE_PIXELS"])


@pytest.fixture(scope="module")
def predictor(served_model_path) -> Predictor:
    return Predictor(served_model_path, provider="cpu")


def id_and_ood_inputs(predictor: Predictor, n: int = 24) -> np.ndarray:
    """Inputs whose local predictions include both decisions, so the comparison covers both."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(n, *predictor.input_shape)).astype(np.float32)
    x[n // 2 :] = load_dataset("digits:test").x[: n - n // 2]  # the served model's own kind of input
    flags = predictor.predict(x).is_ood
    assert flags.any() and not flags.all(), "test inputs should hold both ID and OOD decisions"
    return x


def rejected_counts(client: NcguardClient) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(client.metrics()):
        for sample in family.samples:
            if sample.name == "ncguard_rejected_inputs_total":
                counts[sample.labels["reason"]] = counts.get(sample.labels["reason"], 0.0) + sample.value
    return counts


def assert_same_predictions(answer, expected, classes) -> None:
    np.testing.assert_array_equal(answer.class_index, expected.class_index)
    assert answer.labels == [classes[i] for i in expected.class_index]
    np.testing.assert_allclose(answer.confidence, expected.confidence, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answer.ood_score, expected.ood_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(answer.is_ood, expected.is_ood)


def test_predict_matches_local_predictor(server, predictor):
    x = id_and_ood_inputs(predictor)
    answer = server.predict(x)
    assert_same_predictions(answer, predictor.predict(x), predictor.metadata.classes)
    assert answer.model == predictor.metadata.name
    assert answer.threshold == pytest.approx(predictor.metadata.threshold)


def test_predict_in_several_requests_keeps_the_order(server, predictor):
    x = id_and_ood_inputs(predictor, n=30)
    answer = server.predict(x, batch_size=7)  # 5 requests
    assert_same_predictions(answer, predictor.predict(x), predictor.metadata.classes)


def test_one_unbatched_input_is_one_prediction(server, predictor):
    x = id_and_ood_inputs(predictor)[0]
    response = httpx.post(f"{server.url}/predict", json={"inputs": x.tolist()})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"predictions", "model", "threshold"}
    (row,) = body["predictions"]
    assert set(row) == {"label", "class_index", "confidence", "ood_score", "is_ood", "ood_driver"}
    assert row["class_index"] == int(predictor.predict(x).class_index[0])


def test_ood_decisions_name_the_part_of_the_score_that_drove_them(server, predictor):
    """Each OOD answer names the largest standardized component (ncguard predict's rule), and
    ncguard_ood_decisions_total counts the decisions by that component."""
    assert len(predictor.component_names) > 1  # the served default, fused, is made of parts
    x = id_and_ood_inputs(predictor, n=40)
    local = predictor.predict(x)
    before = _ood_decisions(server.metrics())
    response = httpx.post(f"{server.url}/predict", json={"inputs": x.tolist()})
    rows = response.json()["predictions"]
    expected = [predictor.component_names[d] if flag else None for d, flag in zip(local.driver, local.is_ood)]
    assert [row["ood_driver"] for row in rows] == expected
    assert any(expected) and not all(expected)
    after = _ood_decisions(server.metrics())
    for name in predictor.component_names:
        assert after.get(name, 0) - before.get(name, 0) == expected.count(name)


def _ood_decisions(text: str) -> dict[str, float]:
    counts = {}
    for line in text.splitlines():
        if line.startswith("ncguard_ood_decisions_total{"):
            component = line.split('component="', 1)[1].split('"', 1)[0]
            counts[component] = counts.get(component, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_predict_image_matches_local_decoding_and_predictor(server, predictor):
    channels, height, width = predictor.input_shape
    rng = np.random.default_rng(2)
    images = [png_bytes(rng.integers(0, 256, size=(height, width), dtype=np.uint8)) for _ in range(3)]
    images.append(png_bytes(rng.integers(0, 256, size=(3 * height, 2 * width, 3), dtype=np.uint8)))  # resized, to gray
    images.append(png_bytes(rng.integers(0, 256, size=(height + 5, width + 3, 3), dtype=np.uint8), "JPEG"))
    answer = server.predict_images(images)
    local = np.stack([decode_image(data, channels=channels, size=(height, width)) for data in images])
    assert_same_predictions(answer, predictor.predict(local), predictor.metadata.classes)


def test_predict_image_accepts_one_raw_image_body(server, predictor):
    channels, height, width = predictor.input_shape
    data = png_bytes(np.full((height, width), 200, dtype=np.uint8))
    response = httpx.post(f"{server.url}/predict_image", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200
    local = predictor.predict(decode_image(data, channels=channels, size=(height, width))[None])
    assert response.json()["predictions"][0]["class_index"] == int(local.class_index[0])


def test_model_endpoint_describes_the_served_file(server, served_model_path):
    meta = load_model(served_model_path).metadata
    assert server.model_info() == {
        "name": meta.name,
        "version": meta.version,
        "classes": meta.classes,
        "input_shape": meta.input_shape,
        "score": meta.score,
        "threshold": meta.threshold,
    }


def test_bentoml_health_and_metrics_endpoints(server):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    text = server.metrics()
    assert 'ncguard_http_requests_total{endpoint="/readyz",http_response_code="200"' in text


def _json(payload) -> dict:
    return {"content": json.dumps(payload).encode(), "headers": {"content-type": "application/json"}}


def _grid(value=0.5, shape=(1, 8, 8)):
    return np.full(shape, value).tolist()


def _bad_predict_requests(shape):
    good = np.full(shape, 0.5).tolist()
    raw_nan = ('{"inputs": [' + json.dumps(good).replace("0.5", "NaN", 1) + "]}").encode()
    raw_inf = ('{"inputs": [' + json.dumps(good).replace("0.5", "-Infinity", 1) + "]}").encode()
    wrong_last_axis = np.full((2, *shape[:-1], shape[-1] + 1), 0.5).tolist()
    return [
        ("malformed JSON", {"content": b'{"inputs": [1, 2', "headers": {"content-type": "application/json"}}, 400, "malformed_json", "not valid JSON"),
        ("empty body", {"content": b""}, 400, "malformed_json", "not valid JSON"),
        ("not an object", _json([good]), 400, "missing_field", "JSON object"),
        ("missing field", _json({"data": [good]}), 400, "missing_field", "no field 'inputs'"),
        ("empty batch", _json({"inputs": []}), 422, "empty_batch", "empty"),
        ("wrong rank", _json({"inputs": [np.full(int(np.prod(shape)), 0.5).tolist()]}), 422, "wrong_shape", "shape"),
        ("wrong shape", _json({"inputs": wrong_last_axis}), 422, "wrong_shape", "shape"),
        ("ragged rows", _json({"inputs": [good, [[0.5]]]}), 422, "wrong_shape", "not a regular array"),
        ("strings", _json({"inputs": [np.full(shape, "a").tolist()]}), 422, "wrong_dtype", "dtype"),
        ("booleans", _json({"inputs": [np.full(shape, True).tolist()]}), 422, "wrong_dtype", "dtype"),
        ("nulls", _json({"inputs": [np.full(shape, None).tolist()]}), 422, "wrong_dtype", "dtype"),
        ("NaN", {"content": raw_nan}, 422, "not_finite", "NaN or infinity"),
        ("infinity", {"content": raw_inf}, 422, "not_finite", "NaN or infinity"),
        ("beyond float32", _json({"inputs": [np.full(shape, 1e39).tolist()]}), 422, "not_finite", "NaN or infinity"),
        ("finite but overflowing the network", _json({"inputs": [good, np.full(shape, 3e38).tolist()]}), 422, "overflow", "rows 1 drive"),
        ("batch above the limit", _json({"inputs": [good] * (MAX_INPUTS + 1)}), 413, "batch_too_large", f"more than the {MAX_INPUTS}"),
        ("body above the limit", {"content": b" " * (MAX_BODY + 1) + b'{"inputs": []}'}, 413, "body_too_large", f"larger than the {MAX_BODY} bytes"),
        ("body above the limit, chunked", {"content": iter([b" " * (MAX_BODY // 2)] * 3)}, 413, "body_too_large", "larger than"),
    ]


def _bad_image_requests(shape):
    channels, height, width = shape
    rng = np.random.default_rng(3)
    noisy = png_bytes(rng.integers(0, 256, size=(64, 64), dtype=np.uint8))
    side = int(np.sqrt(MAX_PIXELS)) + 1
    gif = io.BytesIO()
    Image.fromarray(np.zeros((height, width), dtype=np.uint8)).save(gif, "GIF")
    one = png_bytes(np.zeros((height, width), dtype=np.uint8))
    return [
        ("not an image", {"files": [("image", ("a.png", b"definitely not a png"))]}, 422, "bad_image", "not a PNG or JPEG"),
        ("truncated PNG", {"files": [("image", ("cut.png", noisy[: len(noisy) * 3 // 4]))]}, 422, "bad_image", "cut.png"),
        ("GIF", {"files": [("image", ("a.gif", gif.getvalue()))]}, 422, "bad_image", "not a PNG or JPEG"),
        ("oversized image", {"files": [("image", ("big.png", png_bytes(np.zeros((side, side), dtype=np.uint8))))]}, 413, "image_too_large", f"more than the {MAX_PIXELS}"),
        ("no files", {"data": {"note": "no image here"}, "files": [("other", ("", b""))]}, 400, "missing_field", "no image files"),
        ("JSON instead of images", _json({"inputs": [_grid()]}), 415, "unsupported_media_type", "multipart/form-data"),
        ("too many images", {"files": [("image", (f"{i}.png", one)) for i in range(MAX_INPUTS + 1)]}, 413, "batch_too_large", f"more than the {MAX_INPUTS}"),
        ("multipart without boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_multipart", "multipart body"),
        ("empty raw image", {"content": b"", "headers": {"content-type": "image/png"}}, 422, "bad_image", "not a PNG or JPEG"),
    ]


def _bad_requests(shape):
    return [("/predict", *case) for case in _bad_predict_requests(shape)] + [("/predict_image", *case) for case in _bad_image_requests(shape)]


@pytest.mark.parametrize("index", range(len(_bad_requests((1, 8, 8)))), ids=[f"{r[0]} {r[1]}" for r in _bad_requests((1, 8, 8))])
def test_bad_input_gets_a_4xx_that_names_it_and_is_counted(server, predictor, index):
    route, _, request, status, reason, fragment = _bad_requests(predictor.input_shape)[index]
    before = rejected_counts(server)
    response = httpx.post(f"{server.url}{route}", timeout=30, **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert fragment in body["error"]
    after = rejected_counts(server)
    assert after.get(reason, 0) - before.get(reason, 0) == 1
    assert sum(after.values()) - sum(before.values()) == 1
    # and the server keeps answering
    assert len(server.predict(np.full((1, *predictor.input_shape), 0.5, dtype=np.float32)).labels) == 1


def test_there_is_no_internal_route_to_call_from_outside(server):
    for path in ("/infer_batch", "/score", "/batch"):
        response = httpx.post(f"{server.url}{path}", json={"inputs": [[1.0, 2.0]]})
        assert response.status_code in (404, 405), (path, response.status_code)


def test_unknown_paths_share_one_metrics_label_and_are_not_echoed(server):
    before = len(server.metrics())
    for i in range(200):
        response = httpx.get(f"{server.url}/nope-{i}-<script>")
        assert response.status_code == 404
        assert f"nope-{i}" not in response.text
    text = server.metrics()
    assert "nope-" not in text
    assert 'endpoint="other",http_response_code="404"' in text
    assert len(text) - before < 2_000  # the series already exist after the first unknown path


def test_client_turns_refusals_into_data_errors(server, predictor):
    with pytest.raises(DataError, match="NaN or infinity"):
        server.predict(np.full((2, *predictor.input_shape), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="image file not found"):
        server.predict_images(["/nonexistent/image.png"])


def test_client_reports_an_unreachable_service():
    from ncguard.client import free_port

    with NcguardClient(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        assert not client.is_ready()
        with pytest.raises(ServiceError, match="cannot reach"):
            client.model_info()
