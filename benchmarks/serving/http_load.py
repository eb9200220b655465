"""Bounded HTTP load on a local `ncguard serve`: batch size x concurrent clients x request format.

Every client is a thread with its own keep-alive connection sending the same request back to back;
a cell stops after `requests` requests per client or `budget_s` seconds, whichever comes first, so
a slow server cannot make the benchmark run away. Only 127.0.0.1 is ever addressed (the server is
`ncguard.client.local_server`, which also stops it). The client shares the cores with the server,
so these numbers include the client's own cost, as a real caller on the same host would.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ncguard.client import NPY_CONTENT_TYPE, npy_body

FORMATS = {"npy": NPY_CONTENT_TYPE, "json": "application/json"}


def request_body(x: np.ndarray, wire: str) -> bytes:
    return npy_body(x) if wire == "npy" else json.dumps({"inputs": x.tolist()}).encode()


def _client_loop(url: str, body: bytes, content_type: str, requests: int, budget_s: float, start_gate: threading.Barrier) -> tuple[list[float], list[int]]:
    import httpx

    latencies, statuses = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.get("/readyz")  # open the connection before the clock starts
        start_gate.wait()
        deadline = time.perf_counter() + budget_s
        for _ in range(requests):
            t0 = time.perf_counter()
            response = client.post("/predict", content=body, headers={"content-type": content_type})
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            statuses.append(response.status_code)
            if t1 > deadline:
                break
    return latencies, statuses


def load_cell(url: str, x: np.ndarray, *, wire: str, clients: int, requests: int, budget_s: float) -> dict:
    """Throughput (rows/s), p50/p99 request latency and status counts for one cell."""
    body = request_body(x, wire)
    gate = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(_client_loop, url, body, FORMATS[wire], requests, budget_s, gate) for _ in range(clients)]
        gate.wait(timeout=120)  # every client connected: start the clock together
        start = time.perf_counter()
        parts = [f.result() for f in futures]
        elapsed = time.perf_counter() - start
    latencies = [v for part in parts for v in part[0]]
    statuses = [v for part in parts for v in part[1]]
    return {**cell_summary(wire, len(x), clients, latencies, statuses, elapsed), "body_bytes": len(body)}


def cell_summary(wire: str, batch: int, clients: int, latencies_s: list[float], statuses: list[int], elapsed_s: float) -> dict:
    """Throughput of answered rows, p50/p99 latency (ms) and status counts of one load cell."""
    latencies = np.asarray(latencies_s) * 1000
    return {
        "wire": wire,
        "batch": batch,
        "clients": clients,
        "requests": len(statuses),
        "status_counts": {str(code): statuses.count(code) for code in sorted(set(statuses))},
        "rows_per_s": round(statuses.count(200) * batch / elapsed_s, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 3) if len(latencies) else float("nan"),
        "p99_ms": round(float(np.percentile(latencies, 99)), 3) if len(latencies) else float("nan"),
    }
