"""Calling an ncguard service from Python: NumPy arrays or image files in, arrays out.

Built on httpx (no BentoML, no torch needed on the calling side). `local_server` starts
`ncguard serve` on a free loopback port for scripts, demos and tests, and always stops it.

    with NcguardClient("http://127.0.0.1:3000") as client:
        answer = client.predict(x)            # x: [N, *input_shape]
        answer.labels, answer.ood_score, answer.is_ood

Arrays go to /predict as .npy bytes (Content-Type application/x-npy) by default: exact float32 and
no JSON to build or parse on either side; `wire="json"` sends `{"inputs": ...}` instead (for
services older than the .npy format).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import DataError, NcguardError

DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_BATCH_SIZE = 256  # the service's default per-request limit
NPY_CONTENT_TYPE = "application/x-npy"  # serving.validation.NPY_CONTENT_TYPE (the client does not import serving)
WIRE_FORMATS = ("npy", "json")


def npy_body(x: np.ndarray) -> bytes:
    """The .npy bytes of x (np.save; never pickled), as /predict reads them."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(x), allow_pickle=False)
    return buffer.getvalue()


class ServiceError(NcguardError):
    """The service could not be reached, did not start, or failed on its side (5xx)."""


@dataclass(frozen=True)
class ServicePredictions:
    labels: list[str]
    class_index: np.ndarray  # [N] int64
    confidence: np.ndarray  # [N] float64
    ood_score: np.ndarray  # [N] float64
    is_ood: np.ndarray  # [N] bool
    model: str
    threshold: float

    @classmethod
    def from_answers(cls, answers: Sequence[dict]) -> "ServicePredictions":
        rows = [row for answer in answers for row in answer["predictions"]]
        return cls(
            labels=[row["label"] for row in rows],
            class_index=np.array([row["class_index"] for row in rows], dtype=np.int64),
            confidence=np.array([row["confidence"] for row in rows], dtype=np.float64),
            ood_score=np.array([row["ood_score"] for row in rows], dtype=np.float64),
            is_ood=np.array([row["is_ood"] for row in rows], dtype=bool),
            model=answers[0]["model"],
            threshold=float(answers[0]["threshold"]),
        )


MAX_RETRY_WAIT_S = 5


class NcguardClient:
    """A synchronous client for one service; reuse it (it keeps connections open)."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 60.0, api_key: str | None = None, overload_retries: int = 3):
        """`api_key`: sent as `Authorization: Bearer KEY` to a server started with API keys.

        `overload_retries`: how often a request answered 503 with Retry-After (the server's queue was
        full) is sent again after waiting as told (at most MAX_RETRY_WAIT_S each time).
        """
        import httpx

        self.url = url.rstrip("/")
        self.overload_retries = overload_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "NcguardClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        for attempt in range(self.overload_retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise ServiceError(f"cannot reach the ncguard service at {self.url}: {exc}") from None
            retry_after = response.headers.get("retry-after", "")
            if response.status_code != 503 or not retry_after.isdigit() or attempt == self.overload_retries:
                break
            time.sleep(min(int(retry_after), MAX_RETRY_WAIT_S))
        if response.status_code < 400:
            return response
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()[:500] or response.reason_phrase
        if response.status_code < 500:
            raise DataError(f"the service refused the request (HTTP {response.status_code}): {message}")
        raise ServiceError(f"the service failed (HTTP {response.status_code}): {message}")

    def is_ready(self) -> bool:
        import httpx

        try:
            return self._http.get("/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_until_ready(self, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
        """Poll /readyz; give up after `timeout` seconds or as soon as `process` (the server) exits."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if process is not None and process.poll() is not None:
                raise ServiceError(f"the server exited with code {process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise ServiceError(f"the service at {self.url} was not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def model_info(self) -> dict:
        return self._request("GET", "/model").json()

    def metrics(self) -> str:
        """The Prometheus exposition text of /metrics."""
        return self._request("GET", "/metrics").text

    def predict(self, x: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE, wire: str = "npy") -> ServicePredictions:
        """Score inputs [N, *input_shape], sent in requests of at most `batch_size` inputs.

        `wire` is the request format: "npy" (binary, the default) or "json".
        """
        if wire not in WIRE_FORMATS:
            raise DataError(f"unknown wire format {wire!r}; choose one of {', '.join(WIRE_FORMATS)}")
        x = np.asarray(x)
        if x.ndim == 0 or len(x) == 0:
            raise DataError("nothing to predict: the batch is empty")
        if wire == "npy" and x.dtype.kind not in "fiu":
            raise DataError(f"inputs must be numbers, got dtype {x.dtype}")
        answers = []
        for start in range(0, len(x), batch_size):
            part = x[start : start + batch_size]
            if wire == "npy":
                body, content_type = npy_body(part), NPY_CONTENT_TYPE
            else:
                body, content_type = json.dumps({"inputs": part.tolist()}), "application/json"
            answers.append(self._request("POST", "/predict", content=body, headers={"content-type": content_type}).json())
        return ServicePredictions.from_answers(answers)

    def predict_images(self, images: Sequence[str | os.PathLike | bytes], *, batch_size: int = DEFAULT_BATCH_SIZE) -> ServicePredictions:
        """Score PNG/JPEG files (paths or bytes); the service converts them to the model's input."""
        if not images:
            raise DataError("nothing to predict: no images given")
        answers = []
        for start in range(0, len(images), batch_size):
            files = []
            for i, image in enumerate(images[start : start + batch_size], start=start):
                if isinstance(image, (bytes, bytearray)):
                    files.append(("image", (f"image{i}", bytes(image))))
                else:
                    path = Path(image)
                    if not path.is_file():
                        raise DataError(f"image file not found: {path}")
                    files.append(("image", (path.name, path.read_bytes())))
            answers.append(self._request("POST", "/predict_image", files=files).json())
        return ServicePredictions.from_answers(answers)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _serve_command() -> list[str]:
    return [sys.executable, "-m", "ncguard", "serve"]


def _stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's process group (BentoML then stops its workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)  # the group is the server's own: started with start_new_session
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def local_server(
    model_path: str | os.PathLike,
    *,
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout: float = 120.0,
    log_path: str | os.PathLike | None = None,
    api_key: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> Iterator[NcguardClient]:
    """Run `ncguard serve MODEL` on a free port until the block ends; yields a ready client.

    The server's output goes to `log_path` (a temporary file by default); if it fails to start,
    the error includes the end of that log. `cwd`: the server's working directory (`python -m`
    puts it first on sys.path, so a checkout there is the code that runs).
    """
    port = port or free_port(host)
    command = [*_serve_command(), str(model_path), "--host", host, "--port", str(port), "--workers", str(workers)]
    environment = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
    owned_log = log_path is None
    if owned_log:
        handle, log_path = tempfile.mkstemp(prefix="ncguard-serve-", suffix=".log")
        os.close(handle)
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment, start_new_session=True, cwd=cwd)
    client = NcguardClient(f"http://{host}:{port}", api_key=api_key)
    client.server_process = process  # for callers that watch or signal the server (fault tests)
    try:
        try:
            client.wait_until_ready(ready_timeout, process=process)
        except ServiceError as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            where = "" if owned_log else f" ({log_path})"
            raise ServiceError(f"{exc}; end of the server log{where}:\n{tail}") from None
        yield client
    finally:
        client.close()
        _stop(process)
        if owned_log:
            log_path.unlink(missing_ok=True)
