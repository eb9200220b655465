"""Monitoring and memory that stay true under faults, against real servers on 127.0.0.1:
a SIGKILLed worker, a second server beside the first, many large bodies at once."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from benchmarks.reliability import probes

from ncguard.client import local_server
from ncguard.data import load_dataset

pytestmark = pytest.mark.slow

WINDOW = {"NCGUARD_DRIFT_WINDOW": "100", "NCGUARD_DRIFT_MIN_SAMPLES": "20"}


def post_rows(url: str, x: np.ndarray, rows_per_request: int) -> None:
    assert set(probes.post_rows(url, x, rows_per_request)) == {200}


def test_a_killed_workers_gauges_leave_with_it(served_model_path, tmp_path):
    digits = load_dataset("digits:test").x.astype(np.float32)
    noise = np.random.default_rng(0).uniform(0, 1, size=(400, *digits.shape[1:])).astype(np.float32) ** 8
    env = {"BENTOML_HOME": str(tmp_path / "home"), **WINDOW}
    with local_server(served_model_path, workers=2, env=env, ready_timeout=120) as client:
        post_rows(client.url, noise, 5)  # both workers' windows fill with OOD inputs
        text = client.metrics()
        assert max(v for _, v in probes.metric_values(text, "ncguard_ood_rate")) > 0.8
        victim = probes.worker_processes(client)[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        deadline = time.monotonic() + 60
        while len(probes.worker_processes(client)) < 2 and time.monotonic() < deadline:  # BentoML starts a new one
            time.sleep(0.5)
        post_rows(client.url, np.concatenate([digits] * 2)[:800], 4)  # in-distribution traffic only
        text = client.metrics()
        assert f'pid="{victim.pid}"' not in text, "the dead worker's per-worker gauge is still exported"
        # every live window now holds in-distribution traffic: the dead worker's OOD rate of ~1 is gone
        assert max(v for _, v in probes.metric_values(text, "ncguard_ood_rate")) < 0.5, probes.metric_values(text, "ncguard_ood_rate")
        assert max(v for _, v in probes.metric_values(text, "ncguard_drift_score_psi")) < 2.0
        # counters keep what the dead worker counted: they never go backwards
        assert probes.metric_total(text, "ncguard_predictions_total") >= 400 + 800


def test_two_servers_on_one_bentoml_home_keep_their_own_metrics(served_model_path, tmp_path):
    env = {"BENTOML_HOME": str(tmp_path / "shared-home")}
    x = load_dataset("digits:test").x.astype(np.float32)[:30]
    with local_server(served_model_path, env=env, ready_timeout=120) as first:
        post_rows(first.url, x, 10)
        assert probes.metric_total(first.metrics(), "ncguard_predictions_total") == 30
        with local_server(served_model_path, env=env, ready_timeout=120) as second:
            post_rows(second.url, x[:12], 4)
            assert probes.metric_total(first.metrics(), "ncguard_predictions_total") == 30
            assert probes.metric_total(second.metrics(), "ncguard_predictions_total") == 12
        assert probes.metric_total(first.metrics(), "ncguard_predictions_total") == 30


def test_many_large_bodies_at_once_keep_the_servers_memory_bounded(served_model_path, tmp_path):
    """8 concurrent 4 MiB JSON bodies of `1e0,...` (each refused) and 8 of empty lists."""
    limit = 4 * 1024 * 1024
    env = {"BENTOML_HOME": str(tmp_path / "home"), "NCGUARD_MAX_BODY_BYTES": str(limit)}
    numbers = b'{"inputs": [' + b",".join([b"1e0"] * ((limit - 40) // 4)) + b"]}"
    lists = b'{"inputs": [' + b",".join([b"[]"] * ((limit - 40) // 3)) + b"]}"
    assert len(numbers) <= limit and len(lists) <= limit
    with local_server(served_model_path, env=env, ready_timeout=120) as client:
        worker = probes.worker_processes(client)[0]
        before = worker.memory_info().rss
        peak = before

        def send(body: bytes) -> int:
            return httpx.post(f"{client.url}/predict", content=body, headers={"content-type": "application/json"}, timeout=120).status_code

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(send, body) for body in [numbers] * 8 + [lists] * 8]
            while not all(f.done() for f in futures):
                peak = max(peak, worker.memory_info().rss)
                time.sleep(0.01)
            statuses = [f.result() for f in futures]
        assert all(400 <= s < 500 for s in statuses), statuses
        time.sleep(1)
        after = worker.memory_info().rss
    mib = 1024 * 1024
    assert (peak - before) / mib < 150, f"peak grew by {(peak - before) / mib:.0f} MiB"
    assert (after - before) / mib < 50, f"{(after - before) / mib:.0f} MiB stayed resident"
