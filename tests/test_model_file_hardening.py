"""Malformed model files are ModelErrors that name the problem, never tracebacks: wrong types in
any metadata value (the checksum recomputed, so the parser is reached), a directory given as the
model, and the checksum checked before the metadata is parsed. Through load_model and the real
`predict`, `evaluate` and `serve` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from ncguard.errors import ModelError
from ncguard.model_file import CHECKSUM_KEY, load_model, model_checksum
from tests.tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def rewrite(source: Path, target: Path, key: str, value, *, recompute: bool = True) -> Path:
    """Set metadata `ncguard.<key>` to `value` (a JSON text if str, else dumped), recomputing the checksum unless told not to."""
    model = onnx.load(source)
    text = value if isinstance(value, str) else json.dumps(value)
    props = {p.key: p.value for p in model.metadata_props}
    props["ncguard." + key] = text
    onnx.helper.set_model_props(model, props)
    if recompute:
        props[CHECKSUM_KEY] = model_checksum(model)
        onnx.helper.set_model_props(model, props)
    onnx.save(model, target)
    return target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


MALFORMED = [
    ("input_shape", ["a", 8, 8]),
    ("input_shape", []),
    ("input_shape", [0, 8, 8]),
    ("input_shape", [True, 8, 8]),
    ("input_shape", [1.5, 8, 8]),
    ("input_shape", "[1, 8"),  # not JSON
    ("input_shape", {"c": 1}),
    ("classes", "abc"),
    ("classes", [1, 2, 3]),
    ("classes", []),
    ("name", 5),
    ("threshold", "high"),
    ("threshold", "NaN"),
    ("threshold", None),
    ("tpr", None),
    ("tpr", [0.95]),
    ("input_scale", -1),
    ("input_scale", '"255"'),  # a JSON string
    ("score", ["etf"]),
    ("statistics_checksum", 0),
    ("version", 1.0),
    ("run_id", None),
    ("extra", []),
    ("drift_reference", []),
    ("drift_reference", {"score_quantiles": [0, 1]}),
    ("drift_reference", {"score_quantiles": ["x", 1], "class_priors": [0.3, 0.3, 0.4], "feature_mean": [0.0], "feature_std": [1.0]}),
    ("drift_reference", {"score_quantiles": [0, 1], "class_priors": [0.3, 0.3, 0.4], "feature_mean": [0.0], "feature_std": [1.0], "x": 1}),
    ("drift_reference", {"score_quantiles": [0, 1], "class_priors": "abc", "feature_mean": [0.0], "feature_std": [1.0]}),
]


@pytest.mark.parametrize("key, value", MALFORMED, ids=[f"{k}={v!r}" for k, v in MALFORMED])
def test_malformed_metadata_is_a_model_error_naming_the_key(tiny, tmp_path, key, value):
    path = rewrite(tiny, tmp_path / "bad.onnx", key, value)
    with pytest.raises(ModelError, match="ncguard." + key):
        load_model(path)


def test_inconsistent_metadata_is_a_model_error(tiny, tmp_path):
    path = rewrite(tiny, tmp_path / "bad.onnx", "classes", ["a", "b"])  # 3 class priors in the drift reference
    with pytest.raises(ModelError, match="class priors"):
        load_model(path)


def test_the_checksum_is_checked_before_the_metadata_is_parsed(tiny, tmp_path):
    path = rewrite(tiny, tmp_path / "edited.onnx", "input_shape", ["a", 8, 8], recompute=False)
    with pytest.raises(ModelError, match="failed its checksum"):
        load_model(path)


def test_a_directory_is_not_a_model_file(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        load_model(tmp_path)


def ncguard(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NCGUARD_VERIFY_KEY"}
    return subprocess.run([sys.executable, "-m", "ncguard", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_commands_report_bad_model_files_in_one_line(tiny, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    bad = rewrite(tiny, tmp_path / "bad.onnx", "input_shape", ["a", 8, 8])
    for model, phrase in [(bad, "ncguard.input_shape"), (tmp_path, "is a directory")]:
        for command in (["predict", model, tmp_path / "x.npy"], ["evaluate", model, "--id", "digits:test", "--ood", "noise:uniform"],
                        ["serve", model, "--port", "1"]):
            result = ncguard(*command)
            assert result.returncode == 2, (command, result.stderr)
            assert "Traceback" not in result.stderr and phrase in result.stderr, (command, result.stderr)
