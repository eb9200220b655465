"""Serving speed: every way of scoring with one exported model, next to the raw ONNX Runtime session.

    .venv/bin/python benchmarks/serving/bench_serving.py --model MODEL.onnx [--describe TEXT] [--quick]

In one run, on the same model file and inputs (uniform [0, 1] rows of the model's input shape):
- the raw ONNX Runtime session (the ceiling) and the graph without its OOD part, at batch 1, 16, 64,
  alternating call by call (local_paths.bench_graphs): what the OOD score adds to the graph; and the
  raw session from 8 caller threads (what concurrency alone gains on a shared machine); and the OOD
  nodes' share of the kernel time from ONNX Runtime's profiler (local_paths.ood_node_share);
- `ncguard predict`'s own code path (read an .npz, score, format), model loaded once, and one cold
  command (local_paths.bench_predict_cli);
- HTTP /predict on a real `ncguard serve` (1 worker, 127.0.0.1, default settings) at batch 1, 16, 64
  x 1, 8, 32 concurrent clients, with .npy and with JSON bodies (http_load.load_cell; bounded in
  requests and seconds per cell; the server is stopped at the end).
Writes benchmarks/results/serving.{json,md,png} (atomically; report.py). Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_load import load_cell  # noqa: E402
from local_paths import bench_graphs, bench_predict_cli, ood_node_share  # noqa: E402
from report import markdown, ood_cost, plot, rows, verdicts  # noqa: E402

from ncguard.atomic import atomic_write  # noqa: E402
from ncguard.client import local_server  # noqa: E402
from ncguard.model_file import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCHES = [1, 16, 64]
CLIENTS = [1, 8, 32]


def bench_http(model: Path, shape: tuple[int, ...], *, wires: list[str], requests: int, budget_s: float) -> list[dict]:
    rng = np.random.default_rng(0)
    cells = []
    with local_server(model, env={"BENTOML_HOME": tempfile.mkdtemp(prefix="bench-bentoml-")}) as client:
        for wire in wires:
            for batch in BATCHES:
                x = rng.uniform(0, 1, size=(batch, *shape)).astype(np.float32)
                load_cell(client.url, x, wire=wire, clients=1, requests=10, budget_s=5)  # warm-up
                for clients in CLIENTS:
                    cell = load_cell(client.url, x, wire=wire, clients=clients, requests=max(2, requests // clients), budget_s=budget_s)
                    cells.append(cell)
                    print(f"  HTTP {wire:>4} batch {batch:>3} x {clients:>2} clients: {cell['rows_per_s']:>9,.1f} rows/s, p50 {cell['p50_ms']} ms, p99 {cell['p99_ms']} ms, {cell['status_counts']}", flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported .onnx model")
    parser.add_argument("--describe", default="exported model", help="how the --model file was made, for the report")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls per cell")
    parser.add_argument("--notes", default="", help="a paragraph appended to the Markdown report")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    budget = 0.5 if args.quick else 4.0
    calls = 20 if args.quick else 4000

    load_before = os.getloadavg()[0]
    model = Path(args.model)
    meta = load_model(model).metadata
    shape = tuple(meta.input_shape)
    print("raw ONNX Runtime and the graph without the OOD part ...", flush=True)
    graphs = bench_graphs(model, BATCHES, calls=calls, budget_s=2 * budget)
    graphs["profiled"] = ood_node_share(model, BATCHES, calls=30 if args.quick else 300)
    print("ncguard predict ...", flush=True)
    predict = bench_predict_cli(model, BATCHES, calls=calls, budget_s=budget)
    print("HTTP ...", flush=True)
    http = bench_http(model, shape, wires=["npy", "json"], requests=calls // 4, budget_s=budget)

    command = "python benchmarks/serving/bench_serving.py --model " + str(model) + (" --quick" if args.quick else "")
    report = {
        "model": {"path": str(model), "description": args.describe, "name": meta.name, "input_shape": list(shape), "classes": len(meta.classes), "score": meta.score},
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_before": round(load_before, 2),
        "command": command,
        "local": {**graphs, "ncguard_predict": predict},
        "http": http,
        "notes": args.notes,
    }
    report["ood_cost"] = ood_cost(report)
    report["table"] = rows(report)
    report["verdicts"] = verdicts(report, report["table"])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out / "serving.png")
    atomic_write(out / "serving.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / "serving.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
