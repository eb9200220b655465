"""Serving parts that need no running server: settings, the serve command's checks, the body limit."""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ncguard.errors import ConfigError, ModelError
from serving import settings as s
from serving.cli import _check_port, run_serve, serve_environment
from serving.limits import BodySizeLimit


def test_settings_defaults():
    settings = s.ServeSettings.from_env({})
    assert settings.model_path is None
    assert settings.model_tag == s.DEFAULT_MODEL_TAG
    assert (settings.workers, settings.provider, settings.threads) == (1, "auto", None)
    assert settings.max_batch_inputs == s.DEFAULT_MAX_BATCH_INPUTS
    assert settings.batch_size == s.DEFAULT_BATCH_SIZE


@pytest.mark.parametrize(
    "name, value, message",
    [
        (s.WORKERS_ENV, "0", "at least 1"),
        (s.WORKERS_ENV, "two", "not a whole number"),
        (s.MAX_BODY_BYTES_ENV, "-5", "at least 1"),
        (s.PROVIDER_ENV, "tpu", "choose one of"),
        (s.BATCH_SIZE_ENV, "1", "at least 2"),
    ],
)
def test_settings_name_the_bad_variable(name, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        s.ServeSettings.from_env({name: value})
    assert name in str(info.value)


def _args(model, **overrides) -> argparse.Namespace:
    values = dict(model=str(model), host="127.0.0.1", port=3000, workers=1)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_serve_environment_carries_the_options(tmp_path):
    env = serve_environment(_args(tmp_path / "m.onnx", workers=2, max_body_bytes=1000))
    assert env[s.MODEL_ENV] == str((tmp_path / "m.onnx").resolve())
    assert env[s.WORKERS_ENV] == "2"
    assert int(env[s.THREADS_ENV]) >= 1  # two sessions share the cores
    assert env[s.MAX_BODY_BYTES_ENV] == "1000"
    with pytest.raises(ConfigError, match="--workers 0"):
        serve_environment(_args(tmp_path / "m.onnx", workers=0))
    with pytest.raises(ConfigError, match="at least 1"):
        serve_environment(_args(tmp_path / "m.onnx", max_batch_inputs=0))


def test_run_serve_refuses_missing_and_foreign_models(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        run_serve(_args(tmp_path / "missing.onnx"))
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"\x08\x07not an onnx model")
    with pytest.raises(ModelError):
        run_serve(_args(foreign))


def test_busy_or_impossible_ports_are_refused_before_serving():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            _check_port("127.0.0.1", port)
    _check_port("127.0.0.1", port)  # free again once the listener is gone
    with pytest.raises(ConfigError, match="not a TCP port"):
        _check_port("127.0.0.1", 70000)


def test_serve_command_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "serving.cli", str(tmp_path / "missing.onnx")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "error: model file not found" in result.stderr
    assert "Traceback" not in result.stderr


async def _echo(request: Request) -> Response:
    return Response(await request.body())


def _limited_app(limit: int, rejections: list):
    return BodySizeLimit(Starlette(routes=[Route("/echo", _echo, methods=["POST"])]), limit_for_path=lambda path: limit, on_reject=lambda: rejections.append(1))


def _post(app, content):
    async def send():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/echo", content=content)

    return asyncio.run(send())


def test_body_limit_passes_bodies_within_it_unchanged():
    rejections: list = []
    app = _limited_app(100, rejections)
    assert _post(app, b"x" * 100).content == b"x" * 100

    async def chunks():
        for part in (b"ab", b"", b"cd" * 10):
            yield part

    assert _post(app, chunks()).content == b"ab" + b"cd" * 10
    assert rejections == []


def test_body_limit_refuses_larger_bodies_with_413_json():
    rejections: list = []
    app = _limited_app(100, rejections)
    declared = _post(app, b"x" * 101)

    async def chunks():
        for _ in range(3):
            yield b"y" * 40

    streamed = _post(app, chunks())
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {"error": "the request body is larger than the 100 bytes allowed"}
    assert len(rejections) == 2


def test_large_bodies_wait_for_a_slot_small_ones_do_not():
    """With 1 slot for bodies over 50 bytes, large requests are handled one at a time, small ones alongside."""
    active = {"large": 0, "most_large": 0, "small_during_large": 0}

    async def slow_echo(request: Request) -> Response:
        body = await request.body()
        if len(body) > 50:
            active["large"] += 1
            active["most_large"] = max(active["most_large"], active["large"])
            await asyncio.sleep(0.05)
            active["large"] -= 1
        elif active["large"]:
            active["small_during_large"] += 1
        return Response(body)

    app = BodySizeLimit(Starlette(routes=[Route("/echo", slow_echo, methods=["POST"])]), limit_for_path=lambda path: 1000, large_body_bytes=50, large_body_slots=1)

    async def chunked():
        for _ in range(3):
            yield b"z" * 30

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            large = [client.post("/echo", content=b"x" * 80) for _ in range(3)] + [client.post("/echo", content=chunked())]
            small = [client.post("/echo", content=b"s" * 10) for _ in range(3)]

            async def later(coroutine):
                await asyncio.sleep(0.01)
                return await coroutine

            return await asyncio.gather(*large, *(later(c) for c in small))

    responses = asyncio.run(main())
    assert [len(r.content) for r in responses] == [80, 80, 80, 90, 10, 10, 10]
    assert active["most_large"] == 1
    assert active["small_during_large"] == 3


def test_sessions_do_not_spin_between_runs(tmp_path):
    """Every path's session (service, ncguard predict, the benchmark's raw session) gets the option:
    spinning pool threads took the shared cores from the thread with the work (ncguard.runtime)."""
    from ncguard.runtime import ALLOW_SPINNING, Predictor
    from tests.tiny_models import write_tiny_model

    predictor = Predictor(write_tiny_model(tmp_path / "tiny.onnx"), provider="cpu", threads=2)
    options = predictor.session.get_session_options()
    assert options.get_session_config_entry(ALLOW_SPINNING) == "0"
    assert options.intra_op_num_threads == 2
