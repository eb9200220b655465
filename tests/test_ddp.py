"""DistributedDataParallel: two CPU processes under torchrun train one model whose replicas agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from training.runs import load_run
from training.trainer import parameter_fingerprint

pytestmark = pytest.mark.slow


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.ddp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_two_process_ddp_replicas_agree(tmp_path):
    run_dir = tmp_path / "run"
    result = torchrun("--data", "digits", "--out", str(run_dir), "--epochs", "1", "--batch-size", "64", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    replicas = metrics["distributed"]
    assert replicas["world_size"] == 2 and replicas["backend"] == "gloo"
    first, second = replicas["parameter_fingerprints"]
    assert first == second
    # The replicas' fingerprint is that of the model rank 0 saved, and that model has learned.
    model, _, _ = load_run(run_dir)
    assert parameter_fingerprint(model) == first
    assert metrics["test"]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert "written to" in result.stdout


def test_ddp_error_stops_every_process_with_a_message(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("someone else's files")
    result = torchrun("--data", "digits", "--out", str(occupied), "--epochs", "1", "--quiet")
    assert result.returncode != 0
    for rank in (0, 1):  # both replicas stop with the message instead of waiting for each other
        assert f"training.ddp (rank {rank}): error: --out {occupied} already exists" in result.stderr
    ours = result.stderr.split("Traceback")[0]  # what follows is torchrun's own launcher report
    assert "already exists and is not an empty directory" in ours
