"""`ncguard audit MODEL.onnx --data SOURCE [--data SOURCE ...] --out DIR`: OOD and drift of whole datasets.

Per-row results go to Parquet shards in DIR, merged aggregates to DIR/summary.json and a
self-contained DIR/report.html. `--engine ray` runs the scoring on a Ray cluster (`--address`, or a
Ray started for the run); it needs the `scale` extra. Torch-free; Ray is imported only for that engine.
"""

from __future__ import annotations

import argparse
import sys

from .audit.run import ENGINES, TIME_BUCKETS, AuditOptions, run_audit
from .audit.scoring import DEFAULT_BATCH_SIZE
from .audit.sources import DEFAULT_SHARD_ROWS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="an exported or wrapped ncguard model")
    parser.add_argument(
        "--data", action="append", required=True, metavar="SOURCE",
        help="a data SPEC (digits:test, fashion-mnist:test), a .npy/.npz file, a folder of images (recursive; a first-level "
        "subfolder named like a class is the label) or of .npy/.npz shards, or parquet:PATH#COLUMN (arrays or PNG/JPEG bytes); repeatable",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: rows/*.parquet, summary.json, report.html")
    parser.add_argument("--engine", choices=ENGINES, default="local", help="local (embedded, default) or ray")
    parser.add_argument("--address", help="Ray cluster address (ray engine; e.g. 10.0.0.5:6379 or auto); default: start a local Ray for the run")
    parser.add_argument("--workers", type=int, help="scoring threads (local) or Ray actors (ray); default: the CPU count (local), 2 (ray)")
    parser.add_argument("--local-pool", choices=("thread", "process"), default="thread", help="local engine: threads sharing one session (default) or worker processes")
    parser.add_argument("--features", action="store_true", help="also write each row's transfer-feature vector")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted audit in DIR: finished shards are kept, not rescored")
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help=f"rows (or image files) per shard (default {DEFAULT_SHARD_ROWS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"rows per ONNX Runtime call (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--label-column", default="", help="Parquet sources: column of labels (class indices or names)")
    parser.add_argument("--time-column", default="", help="Parquet sources: timestamp column, for aggregates per time bucket")
    parser.add_argument("--time-bucket", choices=TIME_BUCKETS, default="day", help="time bucket width (default day)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html (summary.json is always written)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def format_summary(summary: dict) -> str:
    lines = [
        f"rows scored: {summary['rows']}" + (f" (rejected: {', '.join(f'{k} {v}' for k, v in summary['rejected'].items())})" if summary["rejected"] else ""),
        f"OOD rate: {summary['ood_rate']:.4f} (expected {summary['model']['expected_ood_rate']:.4f})" if summary["ood_rate"] is not None else "OOD rate: -",
    ]
    if summary["accuracy"] is not None:
        lines.append(f"accuracy: {summary['accuracy']:.4f} on {summary['labelled']} labelled rows")
    for name, entry in summary["drift"].items():
        lines.append(f"{name}: {entry['value']:.4f} (alert above {entry['limit']:.3g}){'  ALERT' if entry['alert'] else ''}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options = AuditOptions(
        engine=args.engine, pool=args.local_pool, address=args.address, workers=args.workers, features=args.features, resume=args.resume,
        shard_rows=args.shard_rows, batch_size=args.batch_size, label_column=args.label_column,
        time_column=args.time_column, time_bucket=args.time_bucket, report=not args.no_report, quiet=args.quiet,
    )
    result = run_audit(args.model, args.data, args.out, options)
    print(format_summary(result.summary))
    print(f"results in {result.out}", file=sys.stderr)
    return 0
