"""Shared fixtures. The model the serving tests run against is chosen in ONE place: `served_model_path`."""

from __future__ import annotations

import os
from pathlib import Path

# What `ncguard train` sets before torch loads (training/__init__.py): idle OpenMP threads sleep
# instead of spinning, which on 2 shared cores makes training several times faster. Tests import
# torch before any training code runs, so the setting has to be made here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


# Limits of the test server, small so that the limit tests send small requests.
SERVER_LIMITS = {
    "NCGUARD_MAX_BATCH_INPUTS": "64",
    "NCGUARD_MAX_BODY_BYTES": str(512 * 1024),
    "NCGUARD_MAX_IMAGE_PIXELS": str(256 * 256),
}


@pytest.fixture(scope="session")
def served_model_path(digits_model_path) -> Path:
    """The model every serving test serves: `ncguard export` of `ncguard train --data digits`."""
    return digits_model_path


@pytest.fixture(scope="module")
def server(served_model_path, tmp_path_factory):
    """A real `ncguard serve` on a free 127.0.0.1 port, one per test module; yields a ready client."""
    from ncguard.client import local_server

    bentoml_home = tmp_path_factory.mktemp("bentoml-home")
    env = {**SERVER_LIMITS, "BENTOML_HOME": str(bentoml_home)}
    with local_server(served_model_path, env=env, ready_timeout=120) as client:
        yield client


# ---------------------------------------------------------------------- a trained and exported digits model
# Trained once per test session (real training, real export), shared by every test that needs a
# real ncguard model. DIGITS_TEST_EPOCHS keeps it fast (about 50 s on 2 busy CPU cores) while the
# model still reaches ~99% test accuracy and its etf threshold flags most unseen OOD inputs.
DIGITS_TEST_EPOCHS = 15


@pytest.fixture(scope="session")
def digits_run_dir(tmp_path_factory) -> Path:
    """A finished `ncguard train --data digits --epochs 15` run directory."""
    from training.train import TrainOptions, train

    run_dir = tmp_path_factory.mktemp("digits-run") / "run"
    train(TrainOptions(data="digits", out=str(run_dir), epochs=DIGITS_TEST_EPOCHS, quiet=True).validated())
    return run_dir


@pytest.fixture(scope="session")
def digits_model_path(digits_run_dir, tmp_path_factory) -> Path:
    """`ncguard export` of the digits run with its default score (etf), as one .onnx file."""
    from export.run import export_run

    path, _ = export_run(str(digits_run_dir), str(tmp_path_factory.mktemp("digits-model") / "digits.onnx"))
    return path
