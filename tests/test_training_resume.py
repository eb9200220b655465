"""A training run killed before its first checkpoint can be restarted (issue 14): the plain
command points to --resume, and --resume trains from epoch 1 with the run's own config.json
instead of failing for want of checkpoint.pt. Real `ncguard train` processes, SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--data", "digits", "--epochs", "2", "--quiet"]


def ncguard_train(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ncguard", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def killed_before_first_checkpoint(run_dir: Path) -> None:
    """Start `ncguard train`, SIGKILL it as soon as config.json exists (long before an epoch ends)."""
    process = subprocess.Popen([sys.executable, "-m", "ncguard", "train", *TRAIN, "--out", str(run_dir)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "config.json").is_file():
            assert process.poll() is None, "training ended before writing config.json"
            assert time.monotonic() < deadline, "config.json did not appear"
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def test_a_run_killed_before_its_first_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / "run"
    killed_before_first_checkpoint(run_dir)
    if (run_dir / "checkpoint.pt").exists():
        pytest.fail("the first epoch finished before the kill; the test did not reach the case it is for")
    run_id = json.loads((run_dir / "config.json").read_text())["run_id"]

    plain = ncguard_train(*TRAIN, "--out", run_dir)
    assert plain.returncode == 2 and "--resume" in plain.stderr and "Traceback" not in plain.stderr, plain.stderr

    resumed = ncguard_train(*TRAIN, "--out", run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "model.pt").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_id"] == run_id  # the same run, continued
    assert [r["epoch"] for r in json.loads((run_dir / "metrics.json").read_text())["history"]] == [1, 2]


def test_a_directory_holding_only_a_killed_atomic_write_counts_as_empty(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".config.json.abc123.tmp").write_text("{")  # what atomic_write leaves when killed mid-write
    result = ncguard_train("--data", "digits", "--epochs", "1", "--quiet", "--out", run_dir)
    assert result.returncode == 0, result.stderr


def test_a_foreign_non_empty_directory_is_not_offered_resume(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = ncguard_train(*TRAIN, "--out", tmp_path)
    assert result.returncode == 2 and "holds no run" in result.stderr and "add --resume" not in result.stderr
