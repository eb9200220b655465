"""Training stage: write the ID training sets as .npz and run `ncguard train` for every planned model.

A model whose run directory is complete is skipped, so an interrupted benchmark picks up where it
stopped (an interrupted run resumes from its checkpoint with `--resume`). Each run is a subprocess
of the real CLI: the benchmark measures exactly what users run, and its wall time is the training cost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ncguard.atomic import atomic_write
from ncguard.data import load_dataset
from ncguard.run_dir import RunFiles

from .plan import Budget, ModelSpec, model_specs, train_flags


def training_sets(work: Path, budget: Budget) -> dict[str, str]:
    """Data SPECs by ModelSpec.data_key: "full" (all 10 classes), "near-a" (split a's 6 known classes),
    "proxy-a", "proxy-a2", "proxy-a3" (4 of them each, one per held-out pair of plan.PROXY_HELD_OUT), ...;
    subsets are .npz under `work`, written once, labels renumbered 0..K-1 in the order of ModelSpec.known_classes.

    The full budget trains the 10-class models on the `fashion-mnist` SPEC itself: the command users run.
    """
    specs = {spec.data_key: spec for spec in model_specs(budget)}
    specs.setdefault("full", ModelSpec("full", "etf", 0))  # the cost stage trains on it
    paths = {key: work / "data" / _data_file(key) for key in specs}
    out = {key: str(path) for key, path in paths.items()}
    if budget.train_limit is None:
        out["full"] = "fashion-mnist"
        del paths["full"]
    missing = {key: path for key, path in paths.items() if not path.exists()}
    if not missing:
        return out
    train = load_dataset("fashion-mnist:train")
    rows = np.arange(len(train.y))
    if budget.train_limit is not None:
        rows = np.random.default_rng(0).permutation(rows)[: budget.train_limit]
    x, y = train.x[rows], train.y[rows]
    for key, path in missing.items():
        spec = specs[key]
        known = spec.known_classes
        keep = np.isin(y, known)
        remap = np.full(10, -1)
        remap[list(known)] = np.arange(len(known))
        classes = np.asarray([train.classes[c] for c in known])
        atomic_write(path, lambda stream, x=x[keep], y=remap[y[keep]], classes=classes: np.savez(stream, x=x, y=y, classes=classes))
    return out


def _data_file(key: str) -> str:
    # "fmnist-near6-train.npz" is the name the single near split (a) had before there were three
    return {"full": "fmnist-train.npz", "near-a": "fmnist-near6-train.npz"}.get(key, f"fmnist-{key}-train.npz")


def is_complete(run_dir: Path) -> bool:
    files = RunFiles(run_dir)
    return files.metrics.exists() and files.statistics.exists() and files.model.exists()


def train_all(work: Path, budget: Budget, only: set[str] | None = None) -> dict[str, float]:
    """Train what is missing; returns {model name: wall seconds} of the runs trained now."""
    data = training_sets(work, budget)
    timings: dict[str, float] = {}
    for spec in model_specs(budget):
        if only and spec.name not in only:
            continue
        run_dir = work / "runs" / spec.name
        if is_complete(run_dir):
            continue
        timings[spec.name] = train_one(spec, budget, data[spec.data_key], run_dir)
    return timings


def train_one(spec: ModelSpec, budget: Budget, data: str, run_dir: Path) -> float:
    command = [sys.executable, "-m", "ncguard.cli", "train", "--data", data, "--out", str(run_dir), *train_flags(spec, budget)]
    if (run_dir / "config.json").exists():
        command.append("--resume")
    print(f"[quality] training {spec.name}: {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    timing_file = run_dir / "benchmark-timing.json"
    atomic_write(timing_file, json.dumps({"wall_seconds": seconds, "command": command[3:]}, indent=2))
    return seconds
