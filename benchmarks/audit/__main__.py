"""Audit benchmark: rows/s of the engines against a bare ONNX Runtime loop, and peak memory vs dataset size.

    python -m benchmarks.audit [--model MODEL.onnx] [--rows 1000000] [--memory-rows 100000,1000000] [--smoke]

In one run, on the same synthetic .npy shards (digits rows plus uniform noise, 50,000 rows a file):
- throughput at --rows, in --rounds interleaved rounds: a bare ONNX Runtime loop (the ceiling: read
  the same files, run one session with ncguard's options and default threads, discard the outputs),
  the local engine with 2 threads (its default) and with 2 worker processes, Ray with 1 and 2 workers (a local Ray started for the run), and a
  closing bare loop; plus the bare loop with one intra-op thread (what one Ray actor or one worker
  process runs), for scale. Each engine cell's ratio is against the mean of the bare loops just before and
  just after its round, so the shared machine's changing load hits both sides of a ratio alike; the
  table gives the median over rounds. Engines are timed end to end (start-up included) and in the
  steady state (from the first shard's start in any worker to the last shard written);
- memory at each --memory-rows size: peak RSS of the driver and of the workers (the driver itself
  for the thread pool; the largest worker process or Ray actor otherwise), each cell in a fresh process.
Without --model, a digits model is trained (15 epochs) and exported first, as the tests do.
Writes benchmarks/results/audit.{md,json}. Not a test. Heavy: run it with `nice` on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
FILE_ROWS = 50_000


def make_shards(folder: Path, rows: int, input_shape: tuple[int, ...], seed: int = 0) -> None:
    """rows synthetic inputs in .npy files of FILE_ROWS, generated file by file (bounded memory)."""
    from ncguard.data import load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    base = load_dataset("digits:train").x
    if base.shape[1:] != tuple(input_shape):
        base = np.random.default_rng(seed).random((1000, *input_shape), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for index, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        x = base[rng.integers(0, len(base), n)]
        noise = rng.random(x.shape, dtype=np.float32) * rng.choice([0.0, 0.3, 1.0], size=(n,) + (1,) * (x.ndim - 1)).astype(np.float32)
        np.save(folder / f"shard-{index:05d}.npy", np.clip(x + noise, 0, 1).astype(np.float32))


def train_digits_model(folder: Path) -> Path:
    from export.cli import export_run
    from training.cli import TrainOptions, train

    run_dir = folder / "run"
    train(TrainOptions(data="digits", out=str(run_dir), epochs=15, quiet=True).validated())
    path, _ = export_run(str(run_dir), str(folder / "digits.onnx"))
    return Path(path)


def cell(kind: str, model: Path, shards: Path, scratch: Path, workers: int) -> dict:
    out = scratch / f"out-{kind}-{workers}-{os.urandom(4).hex()}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.audit.one", kind, str(model), str(shards), str(out), str(workers)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600,
    )
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} x{workers} failed:\n{result.stderr[-4000:]}")
    line = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {kind:>5} x{workers}: {line['rows']} rows, {line['rows_per_s']:,.0f} rows/s end to end, "
          f"{(line['steady_rows_per_s'] or 0):,.0f} steady; driver {line['driver_peak_rss'] / 2**20:.0f} MiB, "
          f"worker {line['worker_peak_rss'] / 2**20:.0f} MiB", flush=True)
    return line


def summarize_cells(cells: list[dict], bares: list[dict]) -> list[dict]:
    """One row per engine setting: medians over rounds of rates and ratios; the bare loop first."""
    rows = [{"label": "bare ONNX Runtime loop", "kind": "bare", "workers": 1, "rows": bares[0]["rows"],
             "rows_per_s": float(np.median([b["rows_per_s"] for b in bares])), "steady_rows_per_s": float(np.median([b["rows_per_s"] for b in bares])),
             "ratio": 1.0, "steady_ratio": 1.0, "runs": [round(b["rows_per_s"]) for b in bares],
             "cpu_us_per_row": float(np.median([b["cpu_seconds"] / b["rows"] * 1e6 for b in bares])),
             "driver_peak_rss": max(b["driver_peak_rss"] for b in bares), "worker_peak_rss": max(b["worker_peak_rss"] for b in bares)}]
    for label in dict.fromkeys(c["label"] for c in cells):
        group = [c for c in cells if c["label"] == label]
        rows.append({
            "label": label, "kind": group[0]["kind"], "workers": group[0]["workers"], "rows": group[0]["rows"],
            "rows_per_s": float(np.median([c["rows_per_s"] for c in group])),
            "steady_rows_per_s": float(np.median([c["steady_rows_per_s"] or 0 for c in group])),
            "ratio": float(np.median([c["ratio"] for c in group])),
            "steady_ratio": float(np.median([c["steady_ratio"] for c in group])),
            "runs": [round(c["steady_ratio"], 2) for c in group],
            "cpu_us_per_row": float(np.median([c["cpu_seconds"] / c["rows"] * 1e6 for c in group])),
            "driver_peak_rss": max(c["driver_peak_rss"] for c in group), "worker_peak_rss": max(c["worker_peak_rss"] for c in group),
        })
    return rows


def mib(value) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def markdown(results: dict) -> str:
    t = results["throughput"]
    lines = [
        "# Audit benchmark",
        "",
        f"`python -m benchmarks.audit {results['args']}` on {results['machine']}, {results['date']}. "
        f"Model: {results['model']}. Rows: synthetic digits inputs (digits rows plus uniform noise) in .npy files of {FILE_ROWS:,} rows; "
        "shards of 8,192 rows, ONNX Runtime calls of 1,024 rows. The machine's 2 cores are shared with other work, so "
        "absolute figures move from run to run; the ratios come from one run, with the bare loop measured before and after the engines.",
        "",
        f"## Throughput ({t[0]['rows']:,} rows)",
        "",
        "| path | workers | rows/s end to end | ratio to bare | rows/s steady state | ratio to bare | steady ratio per round | CPU µs per row |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in t:
        runs = ", ".join(f"{v:,}" for v in row["runs"]) + " rows/s" if row["kind"] == "bare" else ", ".join(f"{v:.2f}" for v in row["runs"])
        lines.append(
            f"| {row['label']} | {row['workers']} | {row['rows_per_s']:,.0f} | {row['ratio']:.2f} | "
            f"{row['steady_rows_per_s']:,.0f} | {row['steady_ratio']:.2f} | {runs} | {row['cpu_us_per_row']:.0f} |"
        )
    lines += [
        "",
        f"Medians over {len(results['bare_runs']) - 1} round(s). A ratio compares a cell with the mean of the bare loops run just before and "
        f"after its round (the bare row lists every bare run: their spread is the machine's noise). End to end includes start-up "
        "(loading the model; for Ray, starting a local Ray and its actors: several seconds); the steady state runs from the first "
        "shard's start in any worker to the last shard written. CPU µs per row: user + system CPU time of the cell (driver and "
        "worker processes, start-up included; for Ray not its raylet and GCS daemons) per row, which the other users' load "
        "does not change: the cost of the engine's own work beside ONNX Runtime's.",
        "",
        "## Peak memory",
        "",
        "| rows | engine | driver peak RSS (MiB) | worker peak RSS (MiB) |",
        "| ---: | --- | ---: | ---: |",
    ]
    for row in results["memory"]:
        lines.append(f"| {row['rows']:,} | {row['label']} | {mib(row['driver_peak_rss'])} | {mib(row['worker_peak_rss'])} |")
    lines += ["", "## Goals", ""]
    for goal in results["goals"]:
        lines.append(f"- {goal}")
    if results.get("notes"):
        lines += ["", "## Notes", "", results["notes"]]
    lines.append("")
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    by = {(r["kind"], r["workers"]): r for r in results["throughput"]}
    out = []
    for (kind, workers), target, name in ((("ray", 2), 0.8, "Ray, 2 workers"), (("local", 2), 0.9, "local engine")):
        row = by[(kind, workers)]
        steady, end = row["steady_ratio"], row["ratio"]
        verdict = "met" if steady >= target else "missed"
        out.append(f"{name} >= {target} of the bare loop: {verdict} in the steady state ({steady:.2f}); end to end {end:.2f}.")
    memory = results["memory"]
    for label in sorted({m["label"] for m in memory}):
        cells = sorted((m for m in memory if m["label"] == label), key=lambda m: m["rows"])
        if len(cells) >= 2:
            small, large = cells[0], cells[-1]
            growth_driver = large["driver_peak_rss"] / small["driver_peak_rss"]
            growth_worker = large["worker_peak_rss"] / small["worker_peak_rss"]
            flat = max(growth_driver, growth_worker) < 1.25
            out.append(
                f"Memory flat from {small['rows']:,} to {large['rows']:,} rows ({label}): {'met' if flat else 'missed'} "
                f"(driver x{growth_driver:.2f}, worker x{growth_worker:.2f})."
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an exported ncguard model; default: train and export a digits model first")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the throughput cells (default 1,000,000)")
    parser.add_argument("--memory-rows", default="100000,1000000", help="dataset sizes of the memory cells (default 100000,1000000)")
    parser.add_argument("--describe", default="", help="how the --model file was made, for the report")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the throughput cells (default 2)")
    parser.add_argument("--smoke", action="store_true", help="a quick check: 20,000 throughput rows, one round, memory at 10,000 and 40,000")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--notes", default="", help="a paragraph appended to the Markdown report")
    parser.add_argument("--render", metavar="AUDIT_JSON", help="only rewrite the Markdown from a saved audit.json (with --notes)")
    args = parser.parse_args()
    if args.render:
        from ncguard.atomic import atomic_write

        results = json.loads(Path(args.render).read_text())
        results["notes"] = args.notes or results.get("notes", "")
        atomic_write(Path(args.render), json.dumps(results, indent=2) + "\n")
        atomic_write(Path(args.out_dir) / "audit.md", markdown(results))
        return
    if args.smoke:
        args.rows, args.memory_rows, args.rounds = 20_000, "10000,40000", 1
    sizes = sorted({int(v) for v in args.memory_rows.split(",") if v})
    scratch = Path(tempfile.mkdtemp(prefix="ncguard-audit-bench-"))
    try:
        model = Path(args.model) if args.model else train_digits_model(scratch / "model")
        from ncguard.model_file import load_model

        meta = load_model(model).metadata
        shape = tuple(meta.input_shape)
        datasets = {}
        for rows in sorted({args.rows, *sizes}):
            datasets[rows] = scratch / f"rows-{rows}"
            print(f"writing {rows:,} synthetic rows", flush=True)
            make_shards(datasets[rows], rows, shape)
        print(f"throughput at {args.rows:,} rows, {args.rounds} rounds", flush=True)
        cells, bares = [], []
        for round_ in range(args.rounds):
            bares.append(cell("bare", model, datasets[args.rows], scratch, 1))
            for kind, workers, label in (("bare-1", 1, "bare loop, 1 intra-op thread"), ("local", 2, "local engine (2 threads, the default)"), ("local-process", 2, "local engine (2 processes, --local-pool process)"),
                                         ("ray", 1, "Ray, 1 worker"), ("ray", 2, "Ray, 2 workers")):
                cells.append({**cell(kind, model, datasets[args.rows], scratch, workers), "label": label, "round": round_})
        bares.append(cell("bare", model, datasets[args.rows], scratch, 1))
        for entry in cells:
            around = (bares[entry["round"]]["rows_per_s"] + bares[entry["round"] + 1]["rows_per_s"]) / 2
            entry["bare_around"] = around
            entry["ratio"] = entry["rows_per_s"] / around
            entry["steady_ratio"] = (entry["steady_rows_per_s"] or 0) / around
        throughput = summarize_cells(cells, bares)
        bare_runs = [b["rows_per_s"] for b in bares]
        memory = []
        for rows in sizes:
            print(f"memory at {rows:,} rows", flush=True)
            for kind, workers, label in (("local", 2, "local engine, 2 threads"), ("local-process", 2, "local engine, 2 processes"), ("ray", 2, "Ray, 2 workers")):
                reuse = next((r for r in throughput if r["kind"] == kind and r["workers"] == workers and r["rows"] == rows), None)
                result = reuse or cell(kind, model, datasets[rows], scratch, workers)
                memory.append({**result, "label": label})
        results = {
            "args": " ".join(sys.argv[1:]) or "(defaults)",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "model": f"{meta.name} ({meta.score} score, input {list(shape)})" + (f", {args.describe}" if args.describe else "" if args.model else ", digits, 15 epochs, trained for the run"),
            "throughput": throughput,
            "cells": cells,
            "bare_runs": bares,
            "bare_rows_per_s": float(np.mean(bare_runs)),
            "memory": memory,
            "notes": args.notes,
        }
        results["goals"] = goals(results)
        from ncguard.atomic import atomic_write

        out_dir = Path(args.out_dir)
        atomic_write(out_dir / "audit.json", json.dumps(results, indent=2) + "\n")
        atomic_write(out_dir / "audit.md", markdown(results))
        print(markdown(results))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
