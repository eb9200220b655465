"""One batching queue per worker: concurrent requests become one ONNX Runtime call.

Why not BentoML's adaptive batching. BentoML 1.4 batches only `@bentoml.api` methods, so a
request must pass its typed API layer to be batched: either as the HTTP request itself (about
2 ms of CPU per request on this project's 2-core machines before any work, measured with a no-op
endpoint) or, from the public Starlette routes, through the service's self-proxy, which re-encodes
the validated rows as JSON, parses and validates them again and sends the answer back the same way
(about 5 ms of a 1-row request). With 1-row requests that per-request cost, not ONNX Runtime,
bounded the service at about 0.07 of the runtime's batch-64 throughput. The queue below is what the
self-proxy's dispatcher does without the round trip: validated float32 rows wait in memory, and
whenever the scoring thread is free it takes every waiting row (up to `max_batch_rows`) as one
batch. Nothing waits on a timer: a lone request is scored at once, and under load the rows that
arrive while one batch is being scored form the next one, so batches grow with the load.

Overload is explicit. A request is refused at once with `Overloaded` when the rows already queued
would exceed `max_queue_rows`, and a request still waiting when its latency budget has passed is
shed before it is scored (its caller would give up anyway). Either way the caller gets a
`retry_after` estimate (seconds for the queue to drain at the recent batch rate), which the
service turns into 503 + Retry-After; shed rows are never scored, so they are never counted as
predictions.

One scoring thread per worker: ONNX Runtime parallelises inside a call, and on a few cores two
concurrent calls only compete for the same cores.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class Overloaded(Exception):
    """The queue cannot take or finish this request in time; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Waiting:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Merge concurrent `submit(rows)` calls into batches for one scoring function.

    `score(rows) -> table` takes float32 [N, ...] and returns an array whose first axis is N (one
    row of results per input row); it runs in the batcher's own thread. `on_batch(rows)` and
    `on_shed(requests)` are optional hooks for metrics. Must be used from one event loop.
    """

    def __init__(
        self,
        score: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_rows: int,
        max_queue_rows: int,
        latency_budget_s: float,
        on_batch: Callable[[int], None] | None = None,
        on_shed: Callable[[int], None] | None = None,
    ):
        if max_batch_rows < 1 or max_queue_rows < 1 or latency_budget_s <= 0:
            raise ValueError("max_batch_rows and max_queue_rows must be at least 1 and the latency budget positive")
        self.score = score
        self.max_batch_rows = max_batch_rows
        self.max_queue_rows = max_queue_rows
        self.latency_budget_s = latency_budget_s
        self.on_batch = on_batch
        self.on_shed = on_shed
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ncguard-score")
        self._batch_seconds = 0.01  # running estimate of one batch's scoring time, for Retry-After

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def retry_after(self) -> int:
        """Whole seconds for the queue as it is now to drain at the recent batch rate (at least 1)."""
        batches = math.ceil(self._queued_rows / self.max_batch_rows) + 1
        return max(1, math.ceil(batches * self._batch_seconds))

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Score `rows` with whatever else is waiting; raises Overloaded instead of queueing past the limits."""
        if self._queued_rows + len(rows) > self.max_queue_rows and self._queued_rows > 0:
            self._shed(1)
            raise Overloaded(
                f"overloaded: {self._queued_rows} rows are already waiting (limit {self.max_queue_rows}); retry later",
                self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._dispatch(), name="ncguard-batcher")
        waiting = _Waiting(rows, loop.create_future())
        self._waiting.append(waiting)
        self._queued_rows += len(rows)
        self._wakeup.set()
        return await waiting.future

    def _next_batch(self) -> list[_Waiting]:
        """Take the waiting requests that fit in one batch (always at least one), shedding expired ones."""
        now = time.monotonic()
        batch: list[_Waiting] = []
        rows = 0
        expired = 0
        while self._waiting:
            head = self._waiting[0]
            if batch and rows + len(head.rows) > self.max_batch_rows:
                break
            self._waiting.popleft()
            self._queued_rows -= len(head.rows)
            if head.future.done():  # the caller went away
                continue
            if now - head.enqueued > self.latency_budget_s:
                expired += 1
                head.future.set_exception(
                    Overloaded(
                        f"overloaded: the request waited {now - head.enqueued:.2f} s, past the {self.latency_budget_s:.2f} s budget; retry later",
                        self.retry_after(),
                    )
                )
                continue
            batch.append(head)
            rows += len(head.rows)
        if expired:
            self._shed(expired)
        return batch

    def _shed(self, count: int) -> None:
        if self.on_shed is not None:
            self.on_shed(count)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._next_batch()
            if not batch:
                continue
            x = batch[0].rows if len(batch) == 1 else np.concatenate([w.rows for w in batch])
            started = time.monotonic()
            try:
                table = await loop.run_in_executor(self._executor, self.score, x)
            except Exception as exc:  # the callers see the scoring error; the queue keeps running
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
            if self.on_batch is not None:
                self.on_batch(len(x))
            start = 0
            for waiting in batch:
                stop = start + len(waiting.rows)
                if not waiting.future.done():
                    waiting.future.set_result(table[start:stop])
                start = stop

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
