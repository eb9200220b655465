"""`ncguard audit --engine ray` against a real two-node Ray cluster on 127.0.0.1.

The test starts a Ray head and a second Ray node (`ray start --block`, one CPU each, their own
ports and temp folder), runs the audit through the CLI with `--address`, and checks that every
per-row result equals the local engine's to float tolerance, that the merged aggregates equal the
local engine's and a single pass over all rows, and that both nodes scored shards. The nodes are
stopped at the end by the ids of the processes the test started (SIGTERM, which makes `ray start
--block` stop its node, then SIGKILL to what is left of their process groups), never by name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")

from ncguard import drift
from ncguard.audit import AuditOptions, run_audit
from ncguard.data import load_dataset
from ncguard.runtime import Predictor

from .test_audit_local import read_rows

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_ports() -> list[str]:
    agent, grpc, metrics, runtime_env, manager, objects = free_ports(6)
    return [
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
        "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
        "--node-manager-port", str(manager), "--object-manager-port", str(objects),
    ]


def alive_nodes(address: str, env: dict) -> int:
    code = (
        "import ray; ray.init(address=%r, logging_level='error', log_to_driver=False); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))" % address
    )
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        return 0
    try:
        return int(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def stop(process: subprocess.Popen) -> None:
    """Stop one `ray start --block` we started, and anything left in its process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group we created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=30) if process.poll() is None else None


@pytest.fixture(scope="module")
def ray_cluster():
    if not RAY.exists():
        pytest.skip(f"the ray command is not installed next to {sys.executable}: pip install 'ncguard[scale]'")
    temp = tempfile.mkdtemp(prefix="ncr", dir="/tmp")  # short: Ray's socket paths must stay under 108 characters
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    # Ray 2.60 authenticates clients with a token; this cluster gets its own, given to its nodes
    # and to the audit's driver through the environment (RAY_AUTH_TOKEN_PATH), as a real one would.
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats"]
    logs = open(Path(temp) / "nodes.log", "w")
    processes = []
    try:
        processes.append(subprocess.Popen(
            [str(RAY), "start", "--head", "--port", str(port), "--include-dashboard", "false",
             "--temp-dir", temp, *common, *node_ports()],
            stdout=logs, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        ))
        deadline = time.monotonic() + 120
        while alive_nodes(address, env) < 1:
            if time.monotonic() > deadline or processes[0].poll() is not None:
                pytest.fail(f"the Ray head did not start: {(Path(temp) / 'nodes.log').read_text()[-3000:]}")
            time.sleep(1)
        processes.append(subprocess.Popen(
            [str(RAY), "start", "--address", address, *common, *node_ports()],
            stdout=logs, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        ))
        while alive_nodes(address, env) < 2:
            if time.monotonic() > deadline or processes[1].poll() is not None:
                pytest.fail(f"the second Ray node did not join: {(Path(temp) / 'nodes.log').read_text()[-3000:]}")
            time.sleep(1)
        yield address, env
    finally:
        for process in reversed(processes):
            stop(process)
        logs.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def audit_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-sources")
    x = load_dataset("digits:train").x
    shards = root / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", x[:500])
    np.save(shards / "b.npy", x[500:900])
    return ["digits:test", str(shards)], x[:900]


def test_ray_cluster_audit_equals_the_local_engine_and_one_pass(ray_cluster, audit_sources, digits_model_path, tmp_path):
    specs, shard_rows_x = audit_sources
    address, env = ray_cluster
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    local = run_audit(digits_model_path, specs, local_out, AuditOptions(shard_rows=100, features=True, quiet=True, report=False))

    args = [digits_model_path, *sum((["--data", s] for s in specs), []), "--out", ray_out, "--engine", "ray",
            "--address", address, "--workers", "2", "--shard-rows", "100", "--features"]
    result = subprocess.run([sys.executable, "-m", "ncguard", "audit", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((ray_out / "summary.json").read_text())

    # both nodes worked: two actors, one per node (each node has one CPU)
    assert len(summary["run"]["shards_per_node"]) == 2, summary["run"]
    assert sum(summary["run"]["shards_per_node"].values()) == local.shards_scored == 14

    # per-row results: the same rows, the same outputs to float tolerance
    a, b = read_rows(local_out), read_rows(ray_out)
    assert a.column("row_id").to_pylist() == b.column("row_id").to_pylist()
    for name in ("class_index", "is_ood", "ood_driver", "predicted", "label", "correct", "error"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    for name in ("ood_score", "confidence"):
        np.testing.assert_allclose(a.column(name).to_numpy(), b.column(name).to_numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.column("features").to_pylist()), np.asarray(b.column("features").to_pylist()), rtol=1e-4, atol=1e-5)

    # merged aggregates: identical counts, the same distances
    for key in ("rows", "ood", "labelled", "accuracy", "rejected", "per_class", "score_histogram", "time_buckets"):
        assert summary[key] == json.loads(json.dumps(local.summary[key])), key
    assert [e["row_id"] for e in summary["most_ood"]] == [e["row_id"] for e in local.summary["most_ood"]]
    for name, entry in local.summary["drift"].items():
        assert summary["drift"][name]["value"] == pytest.approx(entry["value"], rel=1e-9, abs=1e-12), name

    # ... and a single pass over all rows with the service's drift functions
    predictor = Predictor(digits_model_path, threads=1)
    x = np.concatenate([load_dataset("digits:test").x, shard_rows_x])
    once = predictor.predict(x)
    reference = predictor.metadata.drift_reference
    assert summary["rows"] == len(x)
    assert summary["ood"] == int(once.is_ood.sum())
    assert summary["drift"]["score_psi"]["value"] == pytest.approx(drift.psi(once.ood_score, reference.score_quantiles), rel=1e-9, abs=1e-9)
    ks = drift.ks_distance(once.ood_score, reference.score_quantiles)
    assert summary["drift"]["score_ks"]["value"] - 1e-9 <= ks <= summary["drift"]["score_ks"]["upper_bound"] + 1e-9
    assert summary["drift"]["class_js"]["value"] == pytest.approx(
        drift.js_distance(drift.class_distribution(once.class_index, 10), reference.class_priors), rel=1e-9
    )
    assert summary["drift"]["feature_mean_shift"]["value"] == pytest.approx(
        drift.mean_shift(once.features.mean(axis=0), reference.feature_mean, reference.feature_std), rel=1e-5
    )
    assert (ray_out / "report.html").is_file()

    # resume on the cluster: two shards lost, only they are scored again
    lost = sorted((ray_out / "rows").glob("part-*.parquet"))[3:5]
    for path in lost:
        path.unlink()
    again = subprocess.run([sys.executable, "-m", "ncguard", "audit", *map(str, args), "--resume", "--no-report"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    resumed = json.loads((ray_out / "summary.json").read_text())
    assert (resumed["run"]["shards_scored"], resumed["run"]["shards_resumed"]) == (2, 12)
    assert resumed["per_class"] == summary["per_class"] and resumed["score_histogram"] == summary["score_histogram"]


def test_ray_engine_without_address_starts_and_stops_its_own_ray(digits_model_path, tmp_path):
    """No --address: a local Ray is started for the run (one CPU per worker) and stopped at its end."""
    out = tmp_path / "out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    args = [digits_model_path, "--data", "digits:test", "--out", out, "--engine", "ray", "--workers", "1", "--shard-rows", "150", "--no-report", "--quiet"]
    result = subprocess.run([sys.executable, "-m", "ncguard", "audit", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    local = run_audit(digits_model_path, ["digits:test"], tmp_path / "local", AuditOptions(shard_rows=150, quiet=True, report=False))
    assert summary["rows"] == 450 and summary["run"]["worker_processes"] == 1
    assert summary["per_class"] == json.loads(json.dumps(local.summary["per_class"]))
    assert summary["score_histogram"] == local.summary["score_histogram"]
