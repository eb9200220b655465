"""Scoring one shard: read it, run the model, build its per-row table and its partial statistics.

The one function both engines call (the local engine in a thread, the Ray engine in an actor), so
their per-row results and partials are the same computation. A shard's output is one Parquet file
whose schema metadata carries the shard's description and its partial statistics: the file is the
unit of completion (written atomically), and `--resume` reads the partials of finished shards
back from the file footers without reading their rows.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..model_file import LoadedModel, load_model
from ..runtime import Predictor
from .partial import Binning, PartialStats
from .sources import Shard, read_shard

PARTIAL_KEY = b"ncguard.audit.partial"
SHARD_KEY = b"ncguard.audit.shard"
DEFAULT_BATCH_SIZE = 1024


@dataclass(frozen=True)
class ScoreOptions:
    batch_size: int = DEFAULT_BATCH_SIZE
    features: bool = False  # write the feature vector of every row
    time_bucket: str = "day"


def predictor_from_bytes(data: bytes, *, threads: int | None = 1) -> Predictor:
    """A Predictor over model bytes (what a Ray actor receives), verified like a file on disk.

    ncguard.model_file.load_model reads paths only, so the bytes go through a private temporary
    file, removed at once.
    """
    handle, path = tempfile.mkstemp(suffix=".onnx", prefix="ncguard-audit-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return Predictor(load_model(path), provider="cpu", threads=threads)
    finally:
        Path(path).unlink(missing_ok=True)


def score_shard(shard: Shard, predictor: Predictor, binning: Binning, options: ScoreOptions):
    """(pyarrow.Table of the shard's rows with the partial in its metadata, PartialStats)."""
    import pyarrow as pa

    meta = predictor.metadata
    classes = list(meta.classes)
    chunk = read_shard(shard, meta.input_shape, classes)
    n = len(chunk.row_ids)
    partial = PartialStats(binning, options.time_bucket)
    class_index = np.zeros(n, np.int32)
    confidence = np.zeros(n, np.float32)
    scores = np.zeros(n, np.float32)
    is_ood = np.zeros(n, bool)
    driver = np.zeros(n, np.int64)  # index into predictor.component_names: what drove an OOD decision
    errors = list(chunk.errors)
    features = np.zeros((n, binning.feature_dim), np.float32) if options.features else None
    ok = chunk.ok.copy()
    rows = np.flatnonzero(ok)
    for start in range(0, rows.size, options.batch_size):
        index = rows[start:start + options.batch_size]
        result = predictor.predict(chunk.x[index], batch_size=options.batch_size, strict=False)
        class_index[index] = result.class_index
        confidence[index] = result.confidence
        scores[index] = result.ood_score
        is_ood[index] = result.is_ood
        driver[index] = result.driver
        if features is not None and result.features.shape[1] == binning.feature_dim:
            features[index] = result.features
        good = result.finite
        for bad in index[~good].tolist():
            ok[bad], errors[bad] = False, "overflow"
        kept = index[good]
        partial.partial_fit(
            result.class_index[good], result.ood_score[good], result.is_ood[good], result.features[good], chunk.labels[kept],
            row_ids=[chunk.row_ids[i] for i in kept.tolist()],
            inputs=chunk.x[kept] if binning.image_input else None,
            timestamps=None if chunk.timestamps is None else chunk.timestamps[kept],
            classes=classes,
        )
    for reason in set(e for e in errors if e):
        partial.reject(reason, sum(1 for e in errors if e == reason))

    labels = chunk.labels
    names = np.asarray(classes, dtype=object)
    columns = {
        "row_id": pa.array(chunk.row_ids, pa.string()),
        "source": pa.array(np.full(n, shard.source, np.int32)),
        "predicted": pa.array(names[class_index], pa.string(), mask=~ok),
        "class_index": pa.array(class_index, mask=~ok),
        "confidence": pa.array(confidence, mask=~ok),
        "ood_score": pa.array(scores, mask=~ok),
        "is_ood": pa.array(is_ood, mask=~ok),
        # the part of the score that drove an OOD decision (null for in-distribution rows)
        "ood_driver": pa.array(np.asarray(predictor.component_names, dtype=object)[driver], pa.string(), mask=~(ok & is_ood)),
        "label": pa.array(names[np.maximum(labels, 0)], pa.string(), mask=labels < 0),
        "correct": pa.array(labels == class_index, mask=(labels < 0) | ~ok),
        "error": pa.array(errors, pa.string()),
    }
    # always present (null without a time column), so every shard of an audit has one schema and
    # the rows folder reads as one table: pyarrow.parquet.read_table(DIR / "rows")
    stamps = chunk.timestamps if chunk.timestamps is not None else np.zeros(n, np.int64)
    columns["timestamp"] = pa.array(stamps.astype("datetime64[s]").astype("datetime64[ms]"), pa.timestamp("ms", tz="UTC"), mask=np.full(n, chunk.timestamps is None))
    if features is not None:
        width = binning.feature_dim
        flat = pa.array(features.reshape(-1))
        columns["features"] = pa.FixedSizeListArray.from_arrays(flat, width) if width else pa.array([[]] * n, pa.list_(pa.float32()))
    table = pa.table(columns)
    table = table.replace_schema_metadata({PARTIAL_KEY: partial.to_json().encode(), SHARD_KEY: shard.to_json().encode()})
    return table, partial


def parquet_bytes(table) -> bytes:
    """The table as one Parquet file's bytes (zstd; what a Ray actor sends back to the driver)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_partial(path, binning: Binning, time_bucket: str = "day") -> tuple[Shard, PartialStats]:
    """The shard description and partial statistics stored in a finished shard's footer."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        return Shard.from_json(metadata[SHARD_KEY].decode()), PartialStats.from_json(metadata[PARTIAL_KEY].decode(), binning, time_bucket)
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a finished ncguard audit shard ({exc}); remove it to rescore that shard") from None


def load_for_audit(model) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)
