"""A cap on request body size, and on how many large bodies a worker holds at once.

Starlette, uvicorn and BentoML read a body whole with no upper bound, so one huge request could
exhaust a worker's memory. This ASGI middleware reads at most `limit` bytes (refusing at once when
Content-Length already says more), answers 413 with `{"error": ...}` past it, and otherwise hands
the buffered body on unchanged. Hand-written because neither Starlette nor BentoML offers one.

The cap bounds one request; many large requests at once still multiply it (8 bodies of 16 MiB and
their parsing held over 1 GB). So a request whose body is larger than `large_body_bytes` (declared,
or found while reading) waits for one of `large_body_slots` slots before its body is read and keeps
it until its answer is sent: memory then grows with the number of slots, not with the number of
large requests in flight; small requests never wait for a slot.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
from typing import Awaitable, Callable

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the memory a large request used back to the system.

    glibc keeps freed memory in its arenas for reuse, and a large body arrives as many chunks of
    tens of KB, so after bursts of large requests a worker stayed larger than it needs to be.
    malloc_trim returns the free pages (a few ms, paid by large requests only). The bodies
    themselves are freed as soon as their answer is sent (see serving.service._json_errors for
    the reference cycle that once held refused ones).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class BodySizeLimit:
    def __init__(
        self,
        app,
        *,
        limit_for_path: Callable[[str], int],
        on_reject: Callable[[], None] | None = None,
        large_body_bytes: int = 1024 * 1024,
        large_body_slots: int = 2,
    ):
        self.app = app
        self.limit_for_path = limit_for_path
        self.on_reject = on_reject
        self.large_body_bytes = large_body_bytes
        self._slots = asyncio.Semaphore(large_body_slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for_path(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        if declared is not None and declared.isdigit() and int(declared) > self.large_body_bytes:
            async with self._slots:
                await self._read_and_forward(scope, receive, send, limit, large_at=None)
            release_freed_memory()
            return
        await self._read_and_forward(scope, receive, send, limit, large_at=self.large_body_bytes)

    async def _read_and_forward(self, scope: Scope, receive: Receive, send: Send, limit: int, *, large_at: int | None, chunks: list[bytes] | None = None, size: int = 0) -> None:
        """Read the body (at most `limit` bytes) and pass it on; past `large_at` bytes, wait for a slot first."""
        chunks = [] if chunks is None else chunks
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
            if large_at is not None and size > large_at:  # no Content-Length said so: take a slot now
                async with self._slots:
                    if more:
                        await self._read_and_forward(scope, receive, send, limit, large_at=None, chunks=chunks, size=size)
                    else:
                        await self._forward(scope, receive, send, b"".join(chunks))
                release_freed_memory()
                return
            if not more:
                break
        await self._forward(scope, receive, send, b"".join(chunks))

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body, only a disconnect can come

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        if self.on_reject is not None:
            self.on_reject()
        payload = json.dumps({"error": f"the request body is larger than the {limit} bytes allowed"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": payload})
