"""Packaging and the demo stage: `bentoml build` makes a Bento holding the service and the model
(offline, in a temporary BENTOML_HOME), the built Bento serves, and the demo's serving stage runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ncguard.client import NcguardClient, free_port
from ncguard.model_file import load_model

ROOT = Path(__file__).resolve().parent.parent


def _offline_prefix() -> list[str]:
    """`unshare -n` (no network at all) where this machine allows it, so the build is proven offline."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def _run(command: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def built_bento(tmp_path_factory, served_model_path):
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {key: value for key, value in os.environ.items() if not key.startswith("NCGUARD_")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True")
    tag = _run([sys.executable, "-m", "serving.model_source", str(served_model_path)], env).stdout.strip().splitlines()[-1]
    assert tag.startswith("ncguard-model:")
    _run([*_offline_prefix(), sys.executable, "-m", "bentoml", "build"], env, cwd=ROOT)
    archive = tmp_path_factory.mktemp("export") / "ncguard.bento"
    _run([sys.executable, "-m", "bentoml", "export", "ncguard:latest", str(archive)], env)
    return env, archive


def test_built_bento_holds_the_service_the_core_and_the_verified_model(built_bento, served_model_path, tmp_path):
    _, archive = built_bento
    with tarfile.open(archive) as bento:
        names = bento.getnames()
        model_members = [n for n in names if n.startswith("./models/ncguard-model/") and n.endswith("/model.onnx")]
        assert len(model_members) == 1
        bento.extract(model_members[0], tmp_path, filter="data")
        bento_yaml = bento.extractfile("./bento.yaml").read().decode()
    for source in ("./src/serving/service.py", "./src/serving/validation.py", "./src/ncguard/runtime.py", "./src/ncguard/model_file.py"):
        assert source in names
    assert not any("/tests/" in n or "/training/" in n for n in names)
    extracted = tmp_path / model_members[0]
    assert extracted.read_bytes() == Path(served_model_path).read_bytes()
    assert load_model(extracted).metadata.name == load_model(served_model_path).metadata.name
    assert "service: serving.service:NcguardService" in bento_yaml
    assert "torch" not in bento_yaml.split("python_requirements", 1)[-1]


def test_built_bento_serves_its_packed_model(built_bento, served_model_path, tmp_path):
    env, _ = built_bento
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "ncguard:latest", "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with NcguardClient(f"http://127.0.0.1:{port}") as client:
            try:
                client.wait_until_ready(120, process=process)
            except Exception:
                pytest.fail("the Bento did not start:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            meta = load_model(served_model_path).metadata
            assert client.model_info()["name"] == meta.name
            x = np.zeros((2, *meta.input_shape), dtype=np.float32)
            assert len(client.predict(x).labels) == 2
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the group of the server started above
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_demo_stage_serves_and_prints_one_line_per_input(served_model_path, tmp_path, capsys):
    from ncguard.cli.demo_serve import serve_and_query
    from ncguard.runtime import Predictor

    predictor = Predictor(served_model_path, provider="cpu")
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, size=(4, *predictor.input_shape)).astype(np.float32)
    kind = np.array(["id", "id", "ood:noise", "ood:inverted"])
    np.savez(tmp_path / "inputs.npz", x=x, kind=kind)
    answer = serve_and_query(served_model_path, tmp_path / "inputs.npz")
    out = capsys.readouterr().out
    expected = predictor.predict(x)
    rows = [line for line in out.splitlines() if line.split(" ", 1)[0] in set(kind)]
    assert len(rows) == len(x)
    for line, k, index, flagged in zip(rows, kind, expected.class_index, expected.is_ood):
        assert line.startswith(k)
        assert predictor.metadata.classes[index] in line
        assert line.rstrip().endswith("OOD" if flagged else "in-distribution")
    np.testing.assert_array_equal(answer.class_index, expected.class_index)
    assert "the server was stopped" in out
