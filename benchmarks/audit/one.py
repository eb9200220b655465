"""One measurement in a fresh process, so that peak RSS (ru_maxrss) describes this cell alone.

    python -m benchmarks.audit.one bare|bare-1|local|local-process|ray MODEL SHARD_DIR OUT_DIR WORKERS

Prints one JSON line: rows, seconds, rows/s (end to end and steady state), driver and worker peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import resource

from ncguard.audit.run import peak_rss_bytes


def bare(model: str, shards: Path, threads: int | None = None) -> dict:
    """The ceiling: one ONNX Runtime session (ncguard's options; default intra-op threads, or
    `threads`) over the same .npy files, batch by batch, outputs discarded. No Parquet, no
    statistics, no per-row bookkeeping."""
    from ncguard.model_file import INPUT_NAME, OUTPUT_NAMES, load_model
    from ncguard.runtime import open_session

    from ncguard.audit.scoring import DEFAULT_BATCH_SIZE

    session = open_session(load_model(model).serialized, provider="cpu", threads=threads)
    rows = 0
    started = time.perf_counter()
    for path in sorted(shards.glob("*.npy")):
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        for start in range(0, len(array), DEFAULT_BATCH_SIZE):
            batch = np.ascontiguousarray(array[start:start + DEFAULT_BATCH_SIZE], dtype=np.float32)
            session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
            rows += len(batch)
    seconds = time.perf_counter() - started
    rss = peak_rss_bytes()
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "steady_rows_per_s": rows / seconds,
            "driver_peak_rss": rss, "worker_peak_rss": rss, "cpu_seconds": cpu_seconds()}


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU seconds of this process (and of its reaped children)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    if children:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += reaped.ru_utime + reaped.ru_stime
    return total


def engine(kind: str, model: str, shards: Path, out: Path, workers: int) -> dict:
    from ncguard.audit import AuditOptions, run_audit

    started = time.perf_counter()
    pool = "process" if kind == "local-process" else "thread"
    engine_name = "local" if kind.startswith("local") else kind
    result = run_audit(model, [str(shards)], out, AuditOptions(engine=engine_name, pool=pool, workers=workers, report=False, quiet=True))
    seconds = time.perf_counter() - started
    run = result.summary["run"]
    rows = result.summary["rows"]
    return {
        "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
        "steady_rows_per_s": run["steady_rows_per_second"],
        "driver_peak_rss": peak_rss_bytes(),
        "worker_peak_rss": run["worker_peak_rss_bytes"],
        "worker_processes": run["worker_processes"],
        # local: this process plus its (reaped) worker processes; Ray: this driver plus the actors
        # (Ray's own daemons, raylet and GCS, are not counted)
        "cpu_seconds": cpu_seconds(children=True) if engine_name == "local" else cpu_seconds() + (run["worker_cpu_seconds"] or 0.0),
    }


def main(argv: list[str]) -> None:
    kind, model, shards, out, workers = argv
    if kind == "bare":
        result = bare(model, Path(shards))
    elif kind == "bare-1":
        result = bare(model, Path(shards), threads=1)
    else:
        result = engine(kind, model, Path(shards), Path(out), int(workers))
    print(json.dumps({"kind": kind, "workers": int(workers), **result}))


if __name__ == "__main__":
    main(sys.argv[1:])
