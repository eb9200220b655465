"""One audit from start to report: the output folder, resuming, the engine, merging, the summary.

Output folder layout:
    manifest.json       what was audited (model checksum, sources, options); --resume must match it
    rows/part-SSS-NNNNNN.parquet   per-row results of shard NNNNNN of source SSS, written atomically,
                        with the shard's partial statistics in the file footer
    summary.json        merged aggregates and drift distances
    report.html         the same, self-contained, with plots
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..atomic import atomic_write
from ..errors import ConfigError
from ..model_file import LoadedModel, load_model
from .partial import Binning, PartialStats
from .progress import Progress
from .scoring import DEFAULT_BATCH_SIZE, ScoreOptions, read_partial
from .sources import DEFAULT_SHARD_ROWS, Shard, SourceOptions, iter_shards

ENGINES = ("local", "ray")
TIME_BUCKETS = ("day", "hour")
ROWS_DIR = "rows"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
REPORT = "report.html"


@dataclass(frozen=True)
class AuditOptions:
    engine: str = "local"
    pool: str = "thread"  # local engine: threads or worker processes (ncguard.audit.local)
    address: str | None = None
    workers: int | None = None
    features: bool = False
    resume: bool = False
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_size: int = DEFAULT_BATCH_SIZE
    label_column: str = ""
    time_column: str = ""
    time_bucket: str = "day"
    report: bool = True
    quiet: bool = False

    def validated(self) -> "AuditOptions":
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.pool not in ("process", "thread"):
            raise ConfigError(f"unknown local pool {self.pool!r}; choose process or thread")
        if self.address and self.engine != "ray":
            raise ConfigError("--address names a Ray cluster; it needs --engine ray")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.shard_rows < 1 or self.batch_size < 1:
            raise ConfigError("--shard-rows and --batch-size must be at least 1")
        if self.time_bucket not in TIME_BUCKETS:
            raise ConfigError(f"--time-bucket must be one of {', '.join(TIME_BUCKETS)}")
        return self


@dataclass
class AuditResult:
    summary: dict
    out: Path
    shards_scored: int
    shards_resumed: int


def _manifest(model: LoadedModel, sources: list[str], options: AuditOptions) -> dict:
    return {
        "model_sha256": hashlib.sha256(model.serialized).hexdigest(),
        "model": model.metadata.name,
        "sources": list(sources),
        "shard_rows": options.shard_rows,
        "features": options.features,
        "label_column": options.label_column,
        "time_column": options.time_column,
        "time_bucket": options.time_bucket,
    }


def _prepare_out(out: Path, manifest: dict, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (it is created when missing)")
    rows = out / ROWS_DIR
    existing = sorted(rows.glob("part-*.parquet")) if rows.is_dir() else []
    manifest_path = out / MANIFEST
    if existing and not resume:
        raise ConfigError(f"{out} already holds an audit ({len(existing)} finished shards); pass --resume to continue it or choose another --out")
    if resume and manifest_path.is_file():
        try:
            before = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{manifest_path} is unreadable ({exc}); cannot resume") from None
        changed = [key for key in manifest if before.get(key) != manifest[key]]
        if changed:
            raise ConfigError(f"cannot resume the audit in {out}: {', '.join(changed)} differ from the first run (see {manifest_path})")
    rows.mkdir(parents=True, exist_ok=True)
    for stale in rows.glob(".part-*.tmp"):  # left by a killed writer; never a finished shard
        stale.unlink(missing_ok=True)
    atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")


def make_engine(model: LoadedModel, options: AuditOptions):
    score = ScoreOptions(batch_size=options.batch_size, features=options.features, time_bucket=options.time_bucket)
    if options.engine == "ray":
        from .ray_engine import RayEngine  # Ray is optional: imported only for this engine

        return RayEngine(model, workers=options.workers, address=options.address, options=score)
    from .local import LocalEngine

    return LocalEngine(model, workers=options.workers, options=score, pool=options.pool)


def run_audit(model_path, sources: list[str], out, options: AuditOptions = AuditOptions()) -> AuditResult:
    """Score every row of `sources` with the model, write per-row shards, aggregates and a report."""
    options = options.validated()
    try:
        import pyarrow.parquet  # noqa: F401  (per-row results are Parquet, whatever the engine)
    except ImportError:
        raise ConfigError("ncguard audit writes Parquet and needs pyarrow: pip install 'ncguard[scale]'") from None
    if not sources:
        raise ConfigError("give at least one --data SOURCE")
    out = Path(out)
    model = model_path if isinstance(model_path, LoadedModel) else load_model(model_path)
    meta = model.metadata
    binning = Binning.from_metadata(meta)
    progress = Progress(quiet=options.quiet)
    _prepare_out(out, _manifest(model, sources, options), options.resume)
    source_options = SourceOptions(options.shard_rows, options.label_column, options.time_column)

    total = PartialStats(binning, options.time_bucket)
    per_source = [PartialStats(binning, options.time_bucket) for _ in sources]
    counters = {"scored": 0, "resumed": 0, "nodes": {}, "worker_peak_rss": 0, "workers": set(), "cpu": {}}
    finished: list[tuple[float, float, int]] = []  # (started, written, rows) per scored shard, wall-clock seconds

    def path_of(shard: Shard) -> Path:
        return out / ROWS_DIR / f"{shard.name}.parquet"

    def add(shard: Shard, partial: PartialStats) -> None:
        total.merge(partial)
        per_source[shard.source].merge(partial)

    def pending() -> Iterator[Shard]:
        for shard in iter_shards(list(sources), source_options, tuple(meta.input_shape)):
            path = path_of(shard)
            if options.resume and path.is_file():
                _, partial = read_partial(path, binning, options.time_bucket)
                add(shard, partial)
                counters["resumed"] += 1
                continue
            yield shard

    def on_done(shard: Shard, partial: PartialStats, info: dict) -> None:
        add(shard, partial)
        counters["scored"] += 1
        finished.append((info.get("started", time.time()), time.time(), partial.rows_ + sum(partial.rejected_.values())))
        if "node" in info:
            counters["nodes"][info["node"]] = counters["nodes"].get(info["node"], 0) + 1
            counters["workers"].add((info["node"], info["pid"]))
            counters["worker_peak_rss"] = max(counters["worker_peak_rss"], int(info["peak_rss"]))
            key = (info["node"], info["pid"])
            counters["cpu"][key] = max(counters["cpu"].get(key, 0.0), float(info.get("cpu", 0.0)))
        progress.shard_done(partial.rows_ + sum(partial.rejected_.values()))

    progress.stage(f"{options.engine} engine, {len(sources)} source(s) -> {out}")
    engine = make_engine(model, options)
    started = time.perf_counter()
    progress.start(None)
    try:
        engine.run(pending(), path_of, on_done)
    finally:
        progress.close()
        engine.close()
    elapsed = time.perf_counter() - started
    if counters["resumed"]:
        progress.stage(f"resumed: {counters['resumed']} finished shards were kept, {counters['scored']} scored now")
    driver_rss = peak_rss_bytes()
    run_info = {
        "engine": options.engine,
        "address": options.address,
        "workers": getattr(engine, "workers", None),
        "seconds": round(elapsed, 3),
        "shards_scored": counters["scored"],
        "shards_resumed": counters["resumed"],
        "rows_per_second": round(sum(rows for _, _, rows in finished) / elapsed, 1) if elapsed > 0 else None,
        "steady_rows_per_second": _steady_rate(finished),
        "driver_peak_rss_bytes": driver_rss,
        "worker_peak_rss_bytes": counters["worker_peak_rss"] or driver_rss,
        "shards_per_node": counters["nodes"],
        "worker_processes": len(counters["workers"]) or None,
        # CPU seconds of the worker processes (their whole life: start-up included), None for threads
        "worker_cpu_seconds": round(sum(counters["cpu"].values()), 3) if counters["cpu"] else None,
    }
    from .summary import build_summary

    summary = build_summary(meta, total, per_source, sources, run_info)
    atomic_write(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    if options.report:
        from .report import write_report

        write_report(out / REPORT, summary, total, meta)
    progress.stage(f"wrote {out / SUMMARY}" + (f" and {out / REPORT}" if options.report else ""))
    return AuditResult(summary, out, counters["scored"], counters["resumed"])


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM from /proc (Linux), else ru_maxrss.

    Not ru_maxrss first: on Linux it survives exec, so a process started by a big parent (a benchmark
    that trained a model, a test runner) would report the parent's size at the fork.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _steady_rate(finished: list[tuple[float, float, int]]) -> float | None:
    """Rows per second from the moment the first shard started scoring (in any worker) to the moment
    the last one was written: the rate without the start-up (loading the model, starting Ray and its
    actors), which a long audit amortizes. Wall-clock times; across machines, as good as their clocks."""
    if not finished:
        return None
    seconds = max(end for _, end, _ in finished) - min(start for start, _, _ in finished)
    return round(sum(rows for _, _, rows in finished) / seconds, 1) if seconds > 0 else None


def options_dict(options: AuditOptions) -> dict:
    return asdict(options)
