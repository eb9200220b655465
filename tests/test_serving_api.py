"""The published API against the real server: OpenAPI document, an OpenAPI-driven fuzzer, BentoML's
own client, API keys, and overload answered with 503 + Retry-After."""

from __future__ import annotations

import io
import json
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import SERVER_LIMITS
from ncguard.client import NcguardClient, local_server
from ncguard.errors import DataError
from ncguard.runtime import Predictor

pytestmark = pytest.mark.slow

PUBLIC = {"/predict": "post", "/predict_image": "post", "/model": "get"}


@pytest.fixture(scope="module")
def predictor(served_model_path) -> Predictor:
    return Predictor(served_model_path, provider="cpu")


def test_openapi_document_publishes_the_public_routes_with_their_schemas(server):
    spec = httpx.get(f"{server.url}/docs.json").json()
    for path, method in PUBLIC.items():
        operation = spec["paths"][path][method]
        assert "200" in operation["responses"] and "401" in operation["responses"]
    predict = spec["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"application/json", "application/x-npy"}
    for status in ("400", "413", "415", "422", "503"):
        assert predict["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "Retry-After" in predict["responses"]["503"]["headers"]
    schemas = spec["components"]["schemas"]
    assert {"PredictResponse", "Prediction", "ModelInfo", "ErrorResponse", "PredictRequest"} <= set(schemas)
    assert set(schemas["Prediction"]["properties"]) == {"label", "class_index", "confidence", "ood_score", "is_ood", "ood_driver"}
    assert not any("infer" in path for path in spec["paths"])  # no internal route is published


def test_openapi_fuzz_finds_no_server_error_and_answers_match_the_schema(server):
    """schemathesis generates requests from /docs.json (a few dozen per operation) against the real server."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance]
    statuses: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in PUBLIC:
            continue

        @settings(max_examples=30, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(base_url=server.url, timeout=30)
            statuses.setdefault(operation.path, []).append(response.status_code)
            case.validate_response(response, checks=checks)

        fuzz()
    assert set(statuses) == set(PUBLIC)
    # GET /model takes nothing, so one request covers it; the POST routes got a few dozen each
    assert all(len(statuses[path]) >= 10 for path in ("/predict", "/predict_image")), {path: len(codes) for path, codes in statuses.items()}
    assert all(code < 500 for codes in statuses.values() for code in codes), statuses


def test_bentoml_sync_client_calls_predict(server, predictor):
    import bentoml

    x = np.full((2, *predictor.input_shape), 0.5, dtype=np.float32)
    with bentoml.SyncHTTPClient(server.url) as client:
        assert {"predict", "predict_image"} <= set(client.endpoints)
        answer = client.predict(inputs=x.tolist())
    expected = predictor.predict(x)
    assert [row["class_index"] for row in answer["predictions"]] == expected.class_index.tolist()
    np.testing.assert_allclose([row["ood_score"] for row in answer["predictions"]], expected.ood_score, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def keyed_server(served_model_path, tmp_path_factory):
    """A server started with `--api-keys FILE` (via NCGUARD_API_KEYS_FILE, what the flag sets)."""
    keys = [secrets.token_urlsafe(24), secrets.token_urlsafe(24)]
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# ncguard API keys\n" + "\n".join(keys) + "\n")
    env = {**SERVER_LIMITS, "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home-keys")), "NCGUARD_API_KEYS_FILE": str(key_file)}
    log_path = tmp_path_factory.mktemp("keyed-log") / "serve.log"
    with local_server(served_model_path, env=env, ready_timeout=120, log_path=log_path, api_key=keys[0]) as client:
        yield client, keys, log_path


def _one_character_off(key: str) -> str:
    """`key` with its last character changed (a fixed replacement would be the key itself for 1 key in 64)."""
    return key[:-1] + ("y" if key.endswith("x") else "x")


def test_api_keys_guard_every_route_but_the_health_probes(keyed_server, predictor):
    client, keys, log_path = keyed_server
    url = client.url
    x = np.full((1, *predictor.input_shape), 0.5, dtype=np.float32)
    body = {"inputs": x.tolist()}
    for path in ("/livez", "/readyz"):
        assert httpx.get(url + path).status_code == 200
    for method, path, kwargs in (("POST", "/predict", {"json": body}), ("GET", "/model", {}), ("GET", "/metrics", {}), ("GET", "/docs.json", {})):
        missing = httpx.request(method, url + path, **kwargs)
        assert missing.status_code == 401, path
        assert "no API key" in missing.json()["error"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = httpx.request(method, url + path, headers={"Authorization": "Bearer " + _one_character_off(keys[0])}, **kwargs)
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]
    assert httpx.post(url + "/predict", json=body, headers={"Authorization": f"Bearer {keys[0]}"}).status_code == 200
    assert httpx.post(url + "/predict", json=body, headers={"X-API-Key": keys[1]}).status_code == 200
    assert httpx.get(url + "/metrics", headers={"X-API-Key": keys[1]}).status_code == 200
    # NcguardClient(api_key=...) sends the key; without it the client reports the refusal
    assert len(client.predict(x).labels) == 1
    with NcguardClient(url) as anonymous, pytest.raises(DataError, match="401"):
        anonymous.model_info()
    # keys never reach the log
    log = log_path.read_text(errors="replace")
    assert not any(key in log for key in keys)


def test_serve_refuses_short_or_unreadable_key_files(served_model_path, tmp_path):
    import subprocess
    import sys

    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    for flag in (str(short), str(tmp_path / "missing.txt")):
        result = subprocess.run([sys.executable, "-m", "ncguard", "serve", str(served_model_path), "--api-keys", flag], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "API key" in result.stderr and "Traceback" not in result.stderr


def test_overload_is_a_503_with_retry_after_and_is_counted(served_model_path, tmp_path, predictor):
    """A queue of 64 rows and 64-row requests from 16 clients at once: some wait in vain and are shed."""
    env = {
        **SERVER_LIMITS,
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
        "NCGUARD_MAX_QUEUE_ROWS": "64",
        "NCGUARD_BATCH_LATENCY_MS": "5",
    }
    x = np.random.default_rng(0).uniform(0, 1, size=(64, *predictor.input_shape)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, x)
    body = buffer.getvalue()
    log_path = tmp_path / "serve.log"
    with local_server(served_model_path, env=env, ready_timeout=120, log_path=log_path) as client:
        stop = threading.Event()

        def hammer(_):
            answers = []
            with httpx.Client(base_url=client.url, timeout=30) as http:
                for _ in range(40):
                    if stop.is_set():
                        break
                    response = http.post("/predict", content=body, headers={"content-type": "application/x-npy"})
                    answers.append((response.status_code, response.headers.get("retry-after"), response.json()))
            return answers

        with ThreadPoolExecutor(16) as pool:
            answers = [a for part in pool.map(hammer, range(16)) for a in part]
        shed = [a for a in answers if a[0] == 503]
        served = [a for a in answers if a[0] == 200]
        assert shed and served, sorted({a[0] for a in answers})
        assert {a[0] for a in answers} <= {200, 503}
        for _, retry_after, payload in shed:
            assert retry_after is not None and int(retry_after) >= 1
            assert payload["error"].startswith("overloaded:")
        text = client.metrics()
        shed_count = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ncguard_shed_requests_total{"))
        predicted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ncguard_predictions_total{"))
        assert shed_count == len(shed)
        assert predicted == 64 * len(served)  # rows of shed requests are never counted as predictions
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert log.count("overloaded: shed") <= 2  # one WARNING line per 10 s at most, not one per request
