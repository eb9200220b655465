"""Serving speed: the service over HTTP next to raw ONNX Runtime on the same model, in one run.

    .venv/bin/python benchmarks/serving/bench_serving.py [--model MODEL.onnx] [--quick]

Measures, on this machine and in this order:
- raw ONNX Runtime (ncguard.runtime.Predictor): batch-1 latency p50/p99, batch-64 throughput;
- HTTP /predict through a real `ncguard serve` (1 worker, loopback): batch-1 latency p50/p99 from
  one sequential client, batch-64 throughput from one and from several concurrent clients;
- adaptive batching under concurrent batch-1 load for a grid of max_batch_size x max_latency_ms:
  throughput, p50/p99, 503 count and the mean number of requests BentoML merged per model call
  (this is what serving.settings' defaults were chosen from).
Writes benchmarks/results/serving.json and serving.md (atomically). Client and server share the
machine's cores, so HTTP numbers include the client's own cost. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ncguard.atomic import atomic_write  # noqa: E402
from ncguard.client import local_server  # noqa: E402
from ncguard.model_file import load_model  # noqa: E402
from ncguard.runtime import Predictor  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _ms(samples: list[float]) -> dict:
    values = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3), "n": len(values)}


def bench_raw(predictor: Predictor, x1: np.ndarray, x64: np.ndarray, n_latency: int, n_throughput: int) -> dict:
    for _ in range(20):
        predictor.predict(x1)
    latencies = []
    for _ in tqdm(range(n_latency), desc="raw ORT batch 1", leave=False):
        start = time.perf_counter()
        predictor.predict(x1)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in tqdm(range(n_throughput), desc="raw ORT batch 64", leave=False):
        predictor.predict(x64)
    elapsed = time.perf_counter() - start
    per_row_us = {}
    for size in (1, 4, 16, 64, 256):
        x = np.resize(x64, (size, *x64.shape[1:]))
        calls = max(20, n_throughput * 64 // size // 4)
        start = time.perf_counter()
        for _ in range(calls):
            predictor.predict(x)
        per_row_us[str(size)] = round((time.perf_counter() - start) / (calls * size) * 1e6, 3)
    return {"batch1": _ms(latencies), "batch64_rows_per_s": round(n_throughput * len(x64) / elapsed, 1), "per_row_us_by_batch_size": per_row_us}


def _body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": x.tolist()}).encode()


def _send_many(url: str, body: bytes, count: int, desc: str | None = None) -> tuple[list[float], list[int]]:
    import httpx

    latencies, statuses = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in tqdm(range(count), desc=desc, leave=False, disable=desc is None):
            start = time.perf_counter()
            response = client.post("/predict", content=body, headers={"content-type": "application/json"})
            latencies.append(time.perf_counter() - start)
            statuses.append(response.status_code)
    return latencies, statuses


def _concurrent(url: str, body: bytes, clients: int, per_client: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(lambda _: _send_many(url, body, per_client), range(clients)))
    elapsed = time.perf_counter() - start
    latencies = [v for part in parts for v in part[0]]
    statuses = [v for part in parts for v in part[1]]
    return {
        "clients": clients,
        "requests": len(statuses),
        "requests_per_s": round(len(statuses) / elapsed, 1),
        "status_counts": {str(code): statuses.count(code) for code in sorted(set(statuses))},
        **_ms(latencies),
    }


def _mean_merged_requests(metrics_text: str) -> float | None:
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("bentoml_service_adaptive_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return round(total / count, 2) if count else None


def bench_http(model: Path, x1: np.ndarray, x64: np.ndarray, n_latency: int, n_throughput: int, clients: int) -> dict:
    with local_server(model, env={"BENTOML_HOME": tempfile.mkdtemp(prefix="bench-bentoml-")}) as client:
        body1, body64 = _body(x1), _body(x64)
        _send_many(client.url, body1, 20)  # warm-up
        latencies, statuses = _send_many(client.url, body1, n_latency, "HTTP batch 1")
        assert set(statuses) == {200}, statuses
        start = time.perf_counter()
        _, statuses = _send_many(client.url, body64, n_throughput, "HTTP batch 64")
        sequential = n_throughput * len(x64) / (time.perf_counter() - start)
        assert set(statuses) == {200}, statuses
        concurrent = _concurrent(client.url, body64, clients, max(1, n_throughput // clients))
    return {
        "batch1": _ms(latencies),
        "batch64_rows_per_s": round(sequential, 1),
        "batch64_concurrent": {**concurrent, "rows_per_s": round(concurrent["requests_per_s"] * len(x64), 1)},
    }


def bench_batching_grid(model: Path, x1: np.ndarray, sizes: list[int], latencies_ms: list[int], clients: int, per_client: int) -> list[dict]:
    rows = []
    body = _body(x1)
    for size in sizes:
        for latency in latencies_ms:
            env = {"BENTOML_HOME": tempfile.mkdtemp(prefix="bench-bentoml-"), "NCGUARD_BATCH_SIZE": str(size), "NCGUARD_BATCH_LATENCY_MS": str(latency)}
            with local_server(model, env=env) as client:
                _send_many(client.url, body, 20)
                result = _concurrent(client.url, body, clients, per_client)
                merged = _mean_merged_requests(client.metrics())
            rows.append({"max_batch_size": size, "max_latency_ms": latency, "mean_requests_per_model_call": merged, **result})
            print(f"  batch {size:>4} latency {latency:>5} ms: {result['requests_per_s']:>7} req/s, p99 {result['p99_ms']} ms, statuses {result['status_counts']}, merged {merged}", flush=True)
    return rows


def _markdown(report: dict) -> str:
    raw, http = report["raw_onnxruntime"], report["http"]
    conc = http["batch64_concurrent"]
    lines = [
        "# Serving speed",
        "",
        f"Model: `{report['model']['path']}` ({report['model']['description']}). {report['machine']}. Written by "
        "`benchmarks/serving/bench_serving.py`; client and server share the cores, so HTTP numbers include the client.",
        "",
        "| path | batch-1 p50 | batch-1 p99 | batch-64 throughput |",
        "| --- | ---: | ---: | ---: |",
        f"| raw ONNX Runtime (Predictor) | {raw['batch1']['p50_ms']} ms | {raw['batch1']['p99_ms']} ms | {raw['batch64_rows_per_s']:,} rows/s |",
        f"| HTTP /predict, 1 worker, 1 client | {http['batch1']['p50_ms']} ms | {http['batch1']['p99_ms']} ms | {http['batch64_rows_per_s']:,} rows/s |",
        f"| HTTP /predict, 1 worker, {conc['clients']} clients | | | {conc['rows_per_s']:,} rows/s (p99 {conc['p99_ms']} ms) |",
        "",
        "Raw ONNX Runtime cost per row by batch size: "
        + ", ".join(f"{size}: {us} us" for size, us in raw["per_row_us_by_batch_size"].items())
        + ".",
        "",
        f"## Adaptive batching under concurrent batch-1 load ({report['batching_grid'][0]['clients']} clients)",
        "",
        "| max_batch_size | max_latency_ms | requests/s | p50 | p99 | statuses | requests merged per model call |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in report["batching_grid"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in row["status_counts"].items())
        lines.append(
            f"| {row['max_batch_size']} | {row['max_latency_ms']} | {row['requests_per_s']} | {row['p50_ms']} ms | {row['p99_ms']} ms | {statuses} | {row['mean_requests_per_model_call']} |"
        )
    lines += ["", report["conclusion"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="exported .onnx model (default: the hand-built tiny 8x8 test model)")
    parser.add_argument("--describe", default="exported model", help="how the --model file was made, for the report")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    n = lambda k: max(10, int(k * scale))  # noqa: E731

    if args.model:
        model = Path(args.model)
        description = args.describe
    else:
        from tests.tiny_models import write_tiny_model

        model = write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-model-")) / "tiny.onnx")
        description = "hand-built tiny model from tests/tiny_models.py: linear 64 -> 3 on 1x8x8 inputs, max-logit score; no trained model existed yet"
    meta = load_model(model).metadata
    rng = np.random.default_rng(0)
    x64 = rng.uniform(0, 1, size=(64, *meta.input_shape)).astype(np.float32)
    x1 = x64[:1]

    print("raw ONNX Runtime ...", flush=True)
    raw = bench_raw(Predictor(model, provider="cpu"), x1, x64, n(2000), n(1000))
    print("HTTP ...", flush=True)
    http = bench_http(model, x1, x64, n(1000), n(300), clients=4)
    print("adaptive batching grid ...", flush=True)
    grid = bench_batching_grid(model, x1, sizes=[16, 64, 256], latencies_ms=[10, 100, 1000], clients=8, per_client=n(60))

    clean = [r for r in grid if set(r["status_counts"]) == {"200"}]
    best = max(clean, key=lambda r: r["requests_per_s"]) if clean else None
    shed = [r for r in grid if set(r["status_counts"]) != {"200"}]
    conclusion = (
        "Defaults (serving/settings.py): max_batch_size 64, max_latency_ms 1000. "
        + (f"Fastest setting with only 200s here: batch {best['max_batch_size']}, latency {best['max_latency_ms']} ms. " if best else "")
        + ("Settings that shed load with non-200 answers: " + ", ".join(f"batch {r['max_batch_size']}/latency {r['max_latency_ms']} ms" for r in shed) + "." if shed else "No setting shed load in this run.")
    )
    report = {
        "model": {"path": str(model), "description": description, "name": meta.name, "input_shape": meta.input_shape, "classes": len(meta.classes)},
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
        "raw_onnxruntime": raw,
        "http": http,
        "batching_grid": grid,
        "conclusion": conclusion,
    }
    out = Path(args.out_dir)
    atomic_write(out / "serving.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / "serving.md", _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
