"""A cap on request body size, enforced before any route reads the body.

Starlette, uvicorn and BentoML read a body whole with no upper bound, so one huge request could
exhaust a worker's memory. This ASGI middleware reads at most `limit` bytes (refusing at once when
Content-Length already says more), answers 413 with `{"error": ...}` past it, and otherwise hands
the buffered body on unchanged. Hand-written because neither Starlette nor BentoML offers one.
"""

from __future__ import annotations

import json
from typing import Awaitable, Callable

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodySizeLimit:
    def __init__(self, app, *, limit_for_path: Callable[[str], int], on_reject: Callable[[], None] | None = None):
        self.app = app
        self.limit_for_path = limit_for_path
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for_path(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        chunks, size = [], 0
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
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
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
