"""Cost stage: seconds per training epoch of both heads, measured on a quiet machine.

The main runs record their epoch times too, but they trained while other jobs shared the two cores,
so their seconds drift by tens of percent. Epochs to reach the target accuracy do not depend on load,
so the report multiplies the main runs' epochs-to-target by the epoch time measured here: a short
`ncguard train` per head (same data, flags and batch size as the main runs), run back to back,
keeping the last epoch (the first one also pays one-time warm-up costs). Whether the machine really
was quiet is recorded: the load average before, and the CPU share the run got (its CPU seconds over
wall seconds times the cores; about 1 when nothing else ran).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ncguard.atomic import atomic_write

from .plan import Budget, ModelSpec, train_flags

EPOCHS = 2
QUIET_LOAD = 0.5  # 1-minute load average above which the measurement is flagged as not quiet


def measure_cost(work: Path, budget: Budget, data: str, force: bool = False) -> dict:
    """{head: seconds of the last of EPOCHS epochs}, plus the load averages; cached in WORK/results/cost.json."""
    target = work / "results" / "cost.json"
    if target.exists() and not force:
        return json.loads(target.read_text())
    load_before = _settled_load(budget.settle_seconds)
    if load_before > QUIET_LOAD:
        print(f"[quality] warning: load average {load_before:.2f} > {QUIET_LOAD}: the epoch times will be inflated", flush=True)
    result = {"epochs_run": EPOCHS, "load_before": round(load_before, 2), "epoch_seconds": {}, "cpu_share": {}}
    for head in ("etf", "plain"):
        run_dir = work / "cost" / head
        shutil.rmtree(run_dir, ignore_errors=True)
        flags = [f for f in train_flags(ModelSpec(f"cost-{head}", head, 0), budget) if f]
        if "--epochs" in flags:
            at = flags.index("--epochs")
            del flags[at:at + 2]
        command = [sys.executable, "-m", "ncguard.cli", "train", "--data", data, "--out", str(run_dir), *flags, "--epochs", str(EPOCHS), "--quiet"]
        print(f"[quality] timing {head}: {' '.join(command[3:])}", flush=True)
        cpu_before, wall_before = _children_cpu_seconds(), time.perf_counter()
        subprocess.run(command, check=True)
        share = (_children_cpu_seconds() - cpu_before) / ((time.perf_counter() - wall_before) * (os.cpu_count() or 1))
        result["cpu_share"][head] = round(share, 2)
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        result["epoch_seconds"][head] = round(float(history[-1]["seconds"]), 2)
        shutil.rmtree(run_dir, ignore_errors=True)
    result["quiet"] = load_before <= QUIET_LOAD
    atomic_write(target, json.dumps(result, indent=2))
    return result


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _settled_load(settle_seconds: float, poll: float = 5.0) -> float:
    """The 1-minute load average once it is at most QUIET_LOAD, waiting up to `settle_seconds`.

    The load average decays with a one-minute time constant, so right after the training stage it
    still reads about 2 on an idle machine; measuring at once would flag a quiet machine as busy.
    """
    deadline = time.monotonic() + settle_seconds
    load = os.getloadavg()[0]
    while load > QUIET_LOAD and time.monotonic() < deadline:
        time.sleep(poll)
        load = os.getloadavg()[0]
    return load
