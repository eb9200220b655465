"""Who may call the service (optional API keys) and what every answer is counted as.

API keys. Off unless configured: `NCGUARD_API_KEYS` (comma-separated) or a key file
(`ncguard serve --api-keys FILE`, NCGUARD_API_KEYS_FILE: one key per line, `#` comments). A request
then needs `Authorization: Bearer KEY` or `X-API-Key: KEY`, or it is answered 401 with
`{"error": ...}`. Every route is behind the key, /metrics and the API documents included (give
Prometheus the key as `authorization: {credentials: KEY}` in its scrape config), except the
health probes /livez, /readyz and /healthz, which orchestrators call without credentials. The
presented key is compared with every configured key in constant time (hmac.compare_digest), so
the answer's timing says nothing about how much of a key was right, and keys are never logged.

Request metrics (`RequestMetrics`, the outermost middleware, so 401s and 413s are counted too):
ncguard_http_requests_total{endpoint, http_response_code} and a latency histogram, with the
endpoint drawn from a fixed set (serving.metrics.endpoint_label), never from the request's path.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Callable, Mapping

from ncguard.errors import ConfigError

from .limits import Receive, Scope, Send

API_KEYS_ENV = "NCGUARD_API_KEYS"
API_KEYS_FILE_ENV = "NCGUARD_API_KEYS_FILE"
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
MIN_KEY_LENGTH = 16  # a short key is guessable; refuse it at start-up rather than serve with it


def read_key_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def configured_keys(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The API keys the environment configures (none: the service is open)."""
    keys = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    key_file = environ.get(API_KEYS_FILE_ENV, "").strip()
    if key_file:
        from_file = read_key_file(key_file)
        if not from_file:
            raise ConfigError(f"the API key file {key_file} holds no keys (one key per line)")
        keys.extend(from_file)
    for index, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(f"API key {index} is {len(key)} characters long; use at least {MIN_KEY_LENGTH} (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if not key.isprintable() or any(c.isspace() for c in key):
            raise ConfigError(f"API key {index} contains spaces or control characters")
    return tuple(dict.fromkeys(keys))


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers") or []:
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return credentials.strip()
    return None


async def _send_json(send: Send, status: int, payload: dict, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeys:
    """ASGI middleware: 401 unless the request carries one of `keys` (all requests pass when there are none)."""

    def __init__(self, app, *, keys: tuple[str, ...]):
        self.app = app
        self.keys = tuple(k.encode() for k in keys)

    def allowed(self, presented: bytes | None) -> bool:
        if presented is None:
            return False
        matched = False
        for key in self.keys:  # every key is compared, whichever matches
            matched |= hmac.compare_digest(presented, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys or scope["type"] != "http" or scope.get("path", "").rstrip("/") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if self.allowed(presented):
            await self.app(scope, receive, send)
            return
        why = "no API key was sent" if presented is None else "the API key is not valid"
        await _send_json(
            send,
            401,
            {"error": f"{why}: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"},
            [(b"www-authenticate", b'Bearer realm="ncguard"')],
        )


class RequestMetrics:
    """ASGI middleware: count every answer and its latency by endpoint and status code."""

    def __init__(self, app, *, metrics: Callable, model: Callable[[], str], endpoint: Callable[[str], str]):
        self.app = app
        self.metrics = metrics
        self.model = model
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            metrics = self.metrics()
            model, endpoint = self.model(), self.endpoint(scope.get("path", ""))
            metrics.requests.labels(model=model, endpoint=endpoint, http_response_code=str(status)).inc()
            metrics.duration.labels(model=model, endpoint=endpoint).observe(time.perf_counter() - started)
