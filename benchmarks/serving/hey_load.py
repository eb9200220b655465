"""HTTP load from `hey`, a low-overhead load generator (Debian's `hey` package), against 127.0.0.1 only.

Why not the Python client here. On 2 cores, Python client threads (httpx, JSON, the GIL) take much
of the CPU the server needs, so the Python cells (http_load) measure client and server together;
`hey` is a compiled Go program that costs a fraction of that. Each cell runs for a fixed time
(`-z`), with `clients` connections sending the same body back to back; `-o csv` gives every
request's latency and status, from which rows/s, p50, p99 and the status counts are computed.
The Python cells stay in the report as "what a Python caller sees".
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from http_load import FORMATS, cell_summary, request_body


def hey_path() -> str:
    path = shutil.which("hey")
    if path is None:
        raise SystemExit("the benchmark needs `hey` (Debian: apt-get install hey)")
    return path


def hey_cell(url: str, x: np.ndarray, *, wire: str, clients: int, seconds: float, headers: dict[str, str] | None = None) -> dict:
    """One cell: POST /predict with `x` as a `wire` body from `clients` connections for `seconds`."""
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"load is only ever sent to this machine, not {url}")
    with tempfile.NamedTemporaryFile(suffix=f".{wire}") as body:
        body.write(request_body(x, wire))
        body.flush()
        command = [hey_path(), "-z", f"{seconds}s", "-c", str(clients), "-m", "POST", "-T", FORMATS[wire], "-D", body.name, "-o", "csv"]
        for name, value in (headers or {}).items():
            command += ["-H", f"{name}: {value}"]
        done = subprocess.run([*command, f"{url}/predict"], capture_output=True, text=True, timeout=seconds + 120)
    records = list(csv.DictReader(io.StringIO(done.stdout)))
    latencies = [float(r["response-time"]) for r in records]
    statuses = [int(r["status-code"]) for r in records]
    elapsed = max(float(r["offset"]) + float(r["response-time"]) for r in records) if records else seconds
    return {**cell_summary(wire, len(x), clients, latencies, statuses, elapsed), "client": "hey"}


def baseline_checkout(ref: str, root: Path) -> Path:
    """A detached git worktree of `ref` (an earlier design to measure beside this one), in a temp folder."""
    target = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(target), ref], check=True, capture_output=True)
    return target


def remove_checkout(path: Path, root: Path) -> None:
    subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(path)], capture_output=True)
    shutil.rmtree(path.parent, ignore_errors=True)
