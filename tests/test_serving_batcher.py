"""serving.batcher.MicroBatcher on its own: merging, splitting, shedding, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import MicroBatcher, Overloaded


class Recorder:
    """A scoring function that remembers its batches; optionally slow or failing."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None):
        self.batches: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        if self.fail_on is not None and (x[:, 0] == self.fail_on).any():
            raise ValueError("bad row")
        time.sleep(self.delay)
        self.batches.append(len(x))
        return np.stack([x[:, 0] * 2, x[:, 0] + 1], axis=1)


def rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None]


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_lone_request_is_scored_at_once_and_alone():
    score = Recorder()
    batcher = MicroBatcher(score, max_batch_rows=64, max_queue_rows=1000, latency_budget_s=1.0)

    async def main():
        started = time.perf_counter()
        table = await batcher.submit(rows(0, 3))
        return table, time.perf_counter() - started

    table, seconds = run(main())
    np.testing.assert_array_equal(table[:, 0], [0, 2, 4])
    assert score.batches == [3] and seconds < 0.5
    batcher.close()


def test_concurrent_requests_merge_and_each_gets_its_own_rows_back():
    score = Recorder()
    batcher = MicroBatcher(score, max_batch_rows=64, max_queue_rows=10_000, latency_budget_s=5.0)

    async def main():
        score.gate.clear()  # hold the first batch so the others queue behind it
        first = asyncio.ensure_future(batcher.submit(rows(0, 1)))
        await asyncio.sleep(0.05)
        others = [asyncio.ensure_future(batcher.submit(rows(100 * i, i))) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        score.gate.set()
        return await first, await asyncio.gather(*others)

    first, others = run(main())
    np.testing.assert_array_equal(first[:, 0], [0])
    for i, table in enumerate(others, 1):
        np.testing.assert_array_equal(table[:, 0], rows(100 * i, i)[:, 0] * 2)
        np.testing.assert_array_equal(table[:, 1], rows(100 * i, i)[:, 0] + 1)
    # 1 + (1 + 2 + ... + 10 = 55 rows): the queued ones went in one batch of at most 64 rows
    assert score.batches == [1, 55]
    batcher.close()


def test_batches_respect_the_row_limit_but_a_large_request_goes_whole():
    score = Recorder()
    batcher = MicroBatcher(score, max_batch_rows=8, max_queue_rows=10_000, latency_budget_s=5.0)

    async def main():
        score.gate.clear()
        head = asyncio.ensure_future(batcher.submit(rows(0, 1)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(rows(0, n))) for n in (5, 5, 20, 3)]
        await asyncio.sleep(0.05)
        score.gate.set()
        await head
        return await asyncio.gather(*queued)

    tables = run(main())
    assert [len(t) for t in tables] == [5, 5, 20, 3]
    assert score.batches == [1, 5, 5, 20, 3]
    batcher.close()


def test_a_full_queue_refuses_at_once_with_a_retry_after():
    score = Recorder()
    shed: list[int] = []
    batcher = MicroBatcher(score, max_batch_rows=4, max_queue_rows=6, latency_budget_s=5.0, on_shed=shed.append)

    async def main():
        score.gate.clear()
        running = asyncio.ensure_future(batcher.submit(rows(0, 4)))
        await asyncio.sleep(0.05)  # taken by the scoring thread, so no longer queued
        waiting = asyncio.ensure_future(batcher.submit(rows(0, 4)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(rows(0, 4))  # 4 queued + 4 > 6
        score.gate.set()
        await running
        await waiting
        return refused.value

    refused = run(main())
    assert refused.retry_after >= 1 and "overloaded" in str(refused)
    assert shed == [1]
    batcher.close()


def test_requests_past_their_latency_budget_are_shed_not_scored():
    score = Recorder(delay=0.3)
    shed: list[int] = []
    batcher = MicroBatcher(score, max_batch_rows=2, max_queue_rows=1000, latency_budget_s=0.1, on_shed=shed.append)

    async def main():
        results = await asyncio.gather(*(batcher.submit(rows(i, 2)) for i in range(4)), return_exceptions=True)
        return results

    results = run(main())
    assert not isinstance(results[0], Exception)
    assert all(isinstance(r, Overloaded) for r in results[1:])
    assert score.batches == [2]  # only the first request was scored
    assert sum(shed) == 3
    batcher.close()


def test_a_scoring_error_reaches_the_callers_of_that_batch_and_the_queue_keeps_going():
    score = Recorder(fail_on=7)
    batcher = MicroBatcher(score, max_batch_rows=64, max_queue_rows=1000, latency_budget_s=5.0)

    async def main():
        with pytest.raises(ValueError, match="bad row"):
            await batcher.submit(rows(7, 1))
        return await batcher.submit(rows(0, 2))

    np.testing.assert_array_equal(run(main())[:, 0], [0, 2])
    batcher.close()
