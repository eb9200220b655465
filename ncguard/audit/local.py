"""The embedded engine: a small pool in this machine, streaming shard by shard, no extra service.

Two pools run the same per-shard scoring:
- `thread` (default): `workers` threads sharing one ONNX Runtime session of one intra-op thread per
  call (concurrent `run` calls on one InferenceSession are thread-safe, and ONNX Runtime, NumPy and
  Parquet writing release the GIL). One process, no start-up, the model in memory once. In the
  benchmark (benchmarks/results/audit.md) it used less CPU per row than the process pool, within
  about a tenth of a bare one-thread ONNX Runtime loop, and the least memory in total.
- `process`: `workers` worker processes (spawned, so nothing of the driver's state is inherited),
  each with its own session, loaded once from the model bytes; each reads, scores and writes its
  shards and returns only the partial statistics (a few KB). For models whose per-row Python work
  (image decoding of large files, say) would hold the GIL. Spawned workers re-import the caller's
  main module: from a script, call run_audit under `if __name__ == "__main__":` (the CLI does).
At most 2 x workers shards are in flight, so memory stays bounded by the shard size whatever the
dataset's size: the driver holds shard descriptions and merged partial statistics, never the rows.
Ctrl-C: the driver stops submitting, workers finish the shard they are on (each file is written
atomically), and finished shards stay for --resume.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

from ..atomic import atomic_write
from ..model_file import LoadedModel, load_model
from ..runtime import Predictor
from .partial import Binning, PartialStats
from .scoring import ScoreOptions, predictor_from_bytes, score_shard
from .sources import Shard

POOLS = ("process", "thread")


def write_table(path: Path, table) -> None:
    """Atomically (temporary name, then os.replace): a shard file is complete or absent."""
    import pyarrow.parquet as pq

    atomic_write(path, lambda handle: pq.write_table(table, handle, compression="zstd"))


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# ------------------------------------------------------------------------- worker-process side
_WORKER: dict = {}


def _init_worker(model_bytes: bytes, options: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the pool cleanly
    predictor = predictor_from_bytes(model_bytes, threads=1)
    _WORKER.update(predictor=predictor, binning=Binning.from_metadata(predictor.metadata), options=ScoreOptions(**options))


def _score_in_worker(shard_json: str, path: str) -> tuple[str, dict]:
    from .run import peak_rss_bytes

    started = time.time()
    table, partial = score_shard(Shard.from_json(shard_json), _WORKER["predictor"], _WORKER["binning"], _WORKER["options"])
    write_table(Path(path), table)
    return partial.to_json(), {"started": started, "pid": os.getpid(), "peak_rss": peak_rss_bytes(), "node": "local", "cpu": time.process_time()}


class LocalEngine:
    name = "local"

    def __init__(self, model, *, workers: int | None = None, options: ScoreOptions = ScoreOptions(), pool: str = "thread"):
        self.workers = int(workers or default_workers())
        self.options = options
        self.pool = pool
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.binning = Binning.from_metadata(self.model.metadata)
        self.predictor = Predictor(self.model, provider="cpu", threads=1) if pool == "thread" else None

    def _executor(self):
        if self.pool == "thread":
            return futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="ncguard-audit")
        return futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(self.model.serialized, vars(self.options).copy()),
        )

    def _submit(self, executor, shard: Shard, path: Path):
        if self.pool == "thread":
            def work():
                started = time.time()
                table, partial = score_shard(shard, self.predictor, self.binning, self.options)
                write_table(path, table)
                return partial, {"started": started}

            return executor.submit(work)
        return executor.submit(_score_in_worker, shard.to_json(), str(path))

    def run(self, shards: Iterator[Shard], path_of: Callable[[Shard], Path], on_done: Callable[[Shard, PartialStats, dict], None]) -> None:
        """Score every shard, write its file, then call on_done(shard, partial, info) on this thread."""

        def finish(shard: Shard, future) -> None:
            partial, info = future.result()
            if isinstance(partial, str):
                partial = PartialStats.from_json(partial, self.binning, self.options.time_bucket)
            on_done(shard, partial, info)

        executor = self._executor()
        pending: collections.deque = collections.deque()
        try:
            for shard in shards:
                pending.append((shard, self._submit(executor, shard, path_of(shard))))
                while len(pending) >= 2 * self.workers:
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
        except BaseException:
            # Ctrl-C or a failed shard: drop what has not started; shards being written finish
            # (their files appear whole) and finished ones stay for --resume.
            for _, future in pending:
                future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
            raise
        executor.shutdown(wait=True)

    def close(self) -> None:
        pass
