"""The embedded engine: a small thread pool over one ONNX Runtime session, streaming shard by shard.

Threads, not processes: ONNX Runtime, NumPy, image decoding and Parquet writing release the GIL, so
`workers` threads each running the session with one intra-op thread keep `workers` cores busy
without copying the model or the rows between processes. Concurrent `run` calls on one
InferenceSession are thread-safe. At most 2 x workers shards are in flight, so memory stays
bounded by the shard size whatever the dataset's size: the driver holds shard descriptions and
the merged partial statistics, never the rows.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from ..atomic import atomic_write
from ..runtime import Predictor
from .partial import Binning, PartialStats
from .scoring import ScoreOptions, score_shard
from .sources import Shard


def write_table(path: Path, table) -> None:
    """Atomically (temporary name, then os.replace): a shard file is complete or absent."""
    import pyarrow.parquet as pq

    atomic_write(path, lambda handle: pq.write_table(table, handle, compression="zstd"))


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LocalEngine:
    name = "local"

    def __init__(self, model, *, workers: int | None = None, options: ScoreOptions = ScoreOptions()):
        self.workers = int(workers or default_workers())
        self.options = options
        self.predictor = Predictor(model, provider="cpu", threads=1)
        self.binning = Binning.from_metadata(self.predictor.metadata)

    def run(self, shards: Iterator[Shard], path_of: Callable[[Shard], Path], on_done: Callable[[Shard, PartialStats, dict], None]) -> None:
        """Score every shard, write its file, then call on_done(shard, partial, info) on this thread."""

        def work(shard: Shard):
            started = time.time()
            table, partial = score_shard(shard, self.predictor, self.binning, self.options)
            write_table(path_of(shard), table)
            return shard, partial, {"started": started}

        pool = futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ncguard-audit")
        pending: collections.deque = collections.deque()
        try:
            for shard in shards:
                pending.append(pool.submit(work, shard))
                while len(pending) >= 2 * self.workers:
                    on_done(*pending.popleft().result())
            while pending:
                on_done(*pending.popleft().result())
        except BaseException:
            # Ctrl-C or a failed shard: drop what has not started; shards being written finish
            # (their files appear whole) and finished ones stay for --resume.
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def close(self) -> None:
        pass
