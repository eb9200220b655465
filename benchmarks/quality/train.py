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

from .plan import NEAR_OOD_KNOWN, Budget, ModelSpec, model_specs, train_flags


def training_sets(work: Path, budget: Budget) -> dict[str, str]:
    """Data SPECs: {"full": all 10 classes, "near": the known 6}; subsets are .npz under `work`, written once.

    The full budget trains the 10-class models on the `fashion-mnist` SPEC itself: the command users run.
    """
    paths = {"full": work / "data" / "fmnist-train.npz", "near": work / "data" / "fmnist-near6-train.npz"}
    specs = {task: str(path) for task, path in paths.items()}
    if budget.train_limit is None:
        specs["full"] = "fashion-mnist"
        del paths["full"]
    if all(path.exists() for path in paths.values()):
        return specs
    train = load_dataset("fashion-mnist:train")
    rows = np.arange(len(train.y))
    if budget.train_limit is not None:
        rows = np.random.default_rng(0).permutation(rows)[: budget.train_limit]
    known = np.isin(train.y[rows], NEAR_OOD_KNOWN)
    subsets = {
        "full": (train.x[rows], train.y[rows], train.classes),
        "near": (train.x[rows][known], train.y[rows][known], tuple(train.classes[c] for c in NEAR_OOD_KNOWN)),
    }
    for task, (x, y, classes) in subsets.items():
        if task not in paths:
            continue
        atomic_write(paths[task], lambda stream, x=x, y=y, classes=classes: np.savez(stream, x=x, y=y, classes=np.asarray(classes)))
    return specs


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
        timings[spec.name] = train_one(spec, budget, data[spec.task], run_dir)
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
