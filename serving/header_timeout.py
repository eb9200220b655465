"""A deadline for receiving a request's head (request line and headers) in BentoML's uvicorn workers.

Why this exists. uvicorn (0.54, what BentoML 1.4 runs) has no timeout on a request that is still
arriving: `timeout_keep_alive` is armed only after a response completes and is cancelled by any
received byte, and nothing is armed when a connection opens. So a client that opens a connection
and sends half a header (or trickles a byte now and then) holds the connection, a file descriptor
and a protocol object for as long as it likes (issue 14 kept one open 130 s; Slowloris does this
with thousands). ASGI middleware cannot help: the app is called only once the head is complete.
BentoML's worker (`_bentoml_impl.worker.service`) builds `uvicorn.Config` itself and forwards only
`timeout_keep_alive` / `timeout_graceful_shutdown` and SSL options, with no way to pass `http=`;
neither `bentoml.serve` nor BentoML's configuration reaches uvicorn's protocol choice.

What it does. `install()` points uvicorn's "auto" HTTP protocol, in the process that calls it, to
`HeadDeadlineProtocol`: uvicorn's own protocol class (httptools when installed, else h11) plus a
timer armed when a connection opens, and again when the first bytes of a next request arrive on a
kept-alive connection. If no complete request head has arrived when it fires, the connection is
closed. A request whose head arrived is never touched by it (its body, the scoring and a slow
response are bounded elsewhere: BentoML's traffic timeout and the body-size limit). The worker
must call `install()` before uvicorn starts, i.e. when serving.service is imported: uvicorn
resolves the protocol in `Config.load()`, which BentoML's worker runs after loading the service.
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .settings import DEFAULT_HEADER_TIMEOUT_S  # why 10 s: see there

log = logging.getLogger("ncguard.serving")


class HeadDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, closing connections whose request head does not arrive within `timeout` seconds."""

    timeout: float = float(DEFAULT_HEADER_TIMEOUT_S)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer = None
        self._head_cycle = None
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        # the first bytes after a finished response start the next request's head
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_deadline()
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()  # the timer holds the protocol: let it go with the connection
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        # uvicorn makes a new request cycle once a head is complete: a changed `cycle` means it arrived
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.timeout, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.cycle is self._head_cycle and self.transport is not None and not self.transport.is_closing():
            client = "%s:%d" % self.client if self.client else "a client"
            log.warning("closed the connection of %s: no complete request head within %.3g s", client, self.timeout)
            self.transport.close()


def install(timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> None:
    """Make uvicorn in this process use HeadDeadlineProtocol for http="auto" (BentoML's choice)."""
    import uvicorn.config

    if not timeout_s > 0:
        raise ValueError(f"the request head timeout must be positive, got {timeout_s}")
    HeadDeadlineProtocol.timeout = float(timeout_s)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeadDeadlineProtocol"
