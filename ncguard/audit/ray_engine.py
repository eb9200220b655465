"""The Ray engine: the same shard scoring as the local engine, as a Ray Data pipeline.

The shard descriptions become a Ray Dataset of one row per shard (one block each, so the actor pool
load-balances shard by shard); `map_batches` runs `ShardScorer`, a callable class, on a fixed pool of
`workers` actors (one CPU each). Each actor opens one ONNX Runtime session (one intra-op thread, as
Ray gives it one CPU) from the model bytes, which the driver puts in the object store once: every
node fetches them once, not once per shard. An actor reads its shard itself (paths must be readable
from every node: a shared filesystem or the same mount everywhere), scores it with
ncguard.audit.scoring.score_shard, and sends back the shard's Parquet file as bytes with its partial
statistics; the driver writes the bytes atomically and merges the partials. So the output folder
only has to exist on the driver, and the driver holds one shard's result at a time.

Ray is imported here only (the optional `ncguard[scale]` extra); the rest of ncguard never imports it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from ..atomic import atomic_write
from ..errors import ConfigError
from .partial import Binning, PartialStats
from .run import peak_rss_bytes
from .scoring import ScoreOptions, parquet_bytes, predictor_from_bytes, score_shard
from .sources import Shard

OBJECT_STORE_BYTES = 256 * 1024 * 1024  # for a Ray started for the run: shards are small


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("the ray engine needs Ray: pip install 'ncguard[scale]' (or use --engine local)") from None
    return ray


class ShardScorer:
    """Ray Data callable class: one ONNX Runtime session per actor, one shard per call."""

    def __init__(self, model_ref: list, options: dict):
        import ray

        self.predictor = predictor_from_bytes(ray.get(model_ref[0]), threads=1)
        self.binning = Binning.from_metadata(self.predictor.metadata)
        self.options = ScoreOptions(**options)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        import pyarrow as pa

        out = {"shard": [], "parquet": [], "partial": [], "rows": [], "node": [], "pid": [], "peak_rss": [], "started": [], "cpu": []}
        for text in batch.column("shard").to_pylist():
            out["started"].append(time.time())
            shard = Shard.from_json(text)
            table, partial = score_shard(shard, self.predictor, self.binning, self.options)
            out["shard"].append(text)
            out["parquet"].append(parquet_bytes(table))
            out["partial"].append(partial.to_json())
            out["rows"].append(table.num_rows)
            out["node"].append(self.node)
            out["pid"].append(os.getpid())
            out["peak_rss"].append(peak_rss_bytes())
            out["cpu"].append(time.process_time())  # this actor's CPU seconds so far
        return pa.table({
            "shard": pa.array(out["shard"], pa.string()),
            "parquet": pa.array(out["parquet"], pa.binary()),
            "partial": pa.array(out["partial"], pa.string()),
            "rows": pa.array(out["rows"], pa.int64()),
            "node": pa.array(out["node"], pa.string()),
            "pid": pa.array(out["pid"], pa.int64()),
            "peak_rss": pa.array(out["peak_rss"], pa.int64()),
            "started": pa.array(out["started"], pa.float64()),
            "cpu": pa.array(out["cpu"], pa.float64()),
        })


class RayEngine:
    name = "ray"

    def __init__(self, model, *, workers: int | None = None, address: str | None = None, options: ScoreOptions = ScoreOptions()):
        self.ray = import_ray()
        self.model = model  # a LoadedModel
        self.workers = int(workers or 2)
        self.address = address
        self.options = options
        self.binning = Binning.from_metadata(model.metadata)
        self.started_here = False

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        kwargs = dict(logging_level="warning", log_to_driver=False, configure_logging=True)
        try:
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.workers, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, **kwargs)
                self.started_here = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise ConfigError(f"cannot start or reach {where}: {exc}") from None
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the audit draws its own
        context.print_on_execution_start = False

    def run(self, shards: Iterable[Shard], path_of: Callable[[Shard], Path], on_done: Callable[[Shard, PartialStats, dict], None]) -> None:
        shards = list(shards)
        if not shards:
            return
        self._connect()
        ray = self.ray
        model_ref = ray.put(self.model.serialized)
        items = [{"shard": shard.to_json()} for shard in shards]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardScorer,
            batch_size=1,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=1,
            fn_constructor_kwargs={"model_ref": [model_ref], "options": vars(self.options).copy()},
        )
        for batch in dataset.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=1):
            for row in batch.to_pylist():
                shard = Shard.from_json(row["shard"])
                atomic_write(path_of(shard), row["parquet"])
                partial = PartialStats.from_json(row["partial"], self.binning, self.options.time_bucket)
                on_done(shard, partial, {"node": row["node"], "pid": row["pid"], "peak_rss": row["peak_rss"], "started": row["started"], "cpu": row["cpu"]})

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()
