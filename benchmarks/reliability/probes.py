"""Small probes of a running `ncguard serve` shared by the reliability benchmark and the fault tests:
its worker processes, the values of a metric in its /metrics text, and posting rows to it."""

from __future__ import annotations

import httpx
import numpy as np
import psutil

from ncguard.client import NPY_CONTENT_TYPE, npy_body


def worker_processes(client) -> list[psutil.Process]:
    """The BentoML worker processes of a server started by ncguard.client.local_server."""
    server = psutil.Process(client.server_process.pid)
    return [p for p in server.children(recursive=True) if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]


def metric_values(text: str, name: str) -> list[tuple[str, float]]:
    """(series, value) of every sample of metric `name` in Prometheus text."""
    return [(line.split(" ")[0], float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


def metric_total(text: str, name: str) -> float:
    return sum(value for _, value in metric_values(text, name))


def npy_bytes(x: np.ndarray) -> bytes:
    """float32 .npy bytes of `x`, as NcguardClient sends them."""
    return npy_body(np.asarray(x, dtype=np.float32))


def post_rows(url: str, x: np.ndarray, rows_per_request: int) -> list[int]:
    """POST `x` in slices, a new connection per request so the kernel spreads them over the workers."""
    statuses = []
    for start in range(0, len(x), rows_per_request):
        response = httpx.post(f"{url}/predict", content=npy_bytes(x[start : start + rows_per_request]), headers={"content-type": NPY_CONTENT_TYPE}, timeout=30)
        statuses.append(response.status_code)
    return statuses
