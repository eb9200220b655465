"""Calibrated confidence (issue 15): ECE, the temperature fit, the exported graph's probabilities
= softmax(logits / T) with the labels unchanged, the metadata, and `ncguard evaluate`'s ECE report."""

import argparse
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scipy.optimize import minimize_scalar

from export.finish import TEMPERATURE_TENSOR
from ncguard.calibration import ECE_BINS, expected_calibration_error
from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.model_file import PREFIX, ModelMetadata, load_model
from ncguard.runtime import Predictor
from ncguard.temperature import TEMPERATURE_BOUNDS, fit_temperature, nll, softmax


# ---------------------------------------------------------------------- ECE


def test_ece_matches_a_hand_computed_case():
    """Five rows, 15 bins ((m-1)/15, m/15]:
    - confidences 0.9, 0.9 (bin 14, (0.8667, 0.9333]): one correct -> |0.5 - 0.9| = 0.4, weight 2/5;
    - 0.6 (bin 9, (0.5333, 0.6]): correct -> |1 - 0.6| = 0.4, weight 1/5;
    - 0.5, 0.5 (bin 8, (0.4667, 0.5333]): both wrong -> |0 - 0.5| = 0.5, weight 2/5.
    ECE = 0.4 * 2/5 + 0.4 * 1/5 + 0.5 * 2/5 = 0.44."""
    probabilities = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.5, 0.3], [0.2, 0.5]])
    probabilities = np.c_[probabilities, 1.0 - probabilities.sum(axis=1)]
    labels = np.array([0, 0, 0, 1, 0])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.44, abs=1e-12)
    assert ECE_BINS == 15
    # One bin: |accuracy - mean confidence| = |2/5 - 0.68|.
    assert expected_calibration_error(probabilities, labels, n_bins=1) == pytest.approx(abs(0.4 - 0.68), abs=1e-12)
    # A perfectly calibrated (and a perfectly confident, always right) classifier has ECE 0.
    assert expected_calibration_error(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 1])) == 0.0
    with pytest.raises(DataError):
        expected_calibration_error(probabilities, labels[:3])
    with pytest.raises(ConfigError):
        expected_calibration_error(probabilities, labels, n_bins=0)


# ---------------------------------------------------------------------- the fit


def synthetic_logits(temperature: float, n: int = 20000, n_classes: int = 10, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / temperature): that T is the true one."""
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.normal(size=(n, n_classes))
    probabilities = softmax(logits, temperature)
    labels = (probabilities.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.25, 1.0, 3.0])
def test_fit_recovers_a_known_temperature(true_temperature):
    logits, labels = synthetic_logits(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # The exact optimum of the NLL (scipy's bounded Brent search agrees to its tolerance).
    reference = minimize_scalar(lambda t: nll(logits, labels, t), bounds=TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-10})
    assert fitted == pytest.approx(reference.x, rel=1e-5)
    assert nll(logits, labels, fitted) <= reference.fun + 1e-12
    # Calibration improves and labels never change.
    assert expected_calibration_error(softmax(logits, fitted), labels) < 0.02
    np.testing.assert_array_equal(softmax(logits, fitted).argmax(axis=1), logits.argmax(axis=1))


def test_fit_stops_at_the_bounds_and_rejects_bad_input():
    logits, labels = synthetic_logits(1.0, n=2000)
    assert fit_temperature(logits, (labels + 1) % 10) == pytest.approx(TEMPERATURE_BOUNDS[1])  # labels never the likely class
    confident = 10.0 * np.eye(4)[np.arange(400) % 4]
    assert fit_temperature(confident, np.arange(400) % 4) == pytest.approx(TEMPERATURE_BOUNDS[0])  # always right: sharpen
    with pytest.raises(DataError):
        fit_temperature(logits, labels[:-1])
    with pytest.raises(DataError):
        fit_temperature(np.full((3, 2), np.nan), np.zeros(3, dtype=int))


# ---------------------------------------------------------------------- metadata


def test_metadata_without_a_temperature_loads_as_one_and_a_bad_one_is_refused(tmp_path):
    from tests.tiny_models import tiny_metadata

    metadata = tiny_metadata(["a", "b"], (1, 8, 8), 4)
    props = metadata.to_props()
    assert json.loads(props[PREFIX + "temperature"]) == 1.0
    del props[PREFIX + "temperature"]  # a file written before the field existed
    assert ModelMetadata.from_props(props).temperature == 1.0
    props[PREFIX + "temperature"] = "0"
    with pytest.raises(ModelError, match="temperature"):
        ModelMetadata.from_props(props)


# ---------------------------------------------------------------------- the exported digits model


def test_exported_probabilities_are_softmax_of_logits_over_the_stored_temperature(digits_model_path):
    from ncguard.data import load_dataset

    loaded = load_model(digits_model_path)
    temperature = loaded.metadata.temperature
    (stored,) = [numpy_helper.to_array(t) for t in loaded.proto.graph.initializer if t.name == TEMPERATURE_TENSOR]
    assert float(stored) == temperature
    assert temperature != 1.0 and TEMPERATURE_BOUNDS[0] < temperature < TEMPERATURE_BOUNDS[1]
    error = loaded.metadata.extra["calibration_error"]
    assert error["ece_after"] < error["ece_before"]

    test = load_dataset("digits:test")
    result = Predictor(digits_model_path, provider="cpu").predict(test.x)
    np.testing.assert_allclose(result.probabilities, softmax(result.logits, temperature), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.class_index, result.logits.argmax(axis=1))  # labels unchanged
    assert expected_calibration_error(result.probabilities, test.y) < expected_calibration_error(softmax(result.logits), test.y)
    assert onnx.checker.check_model(loaded.proto) is None


def test_evaluate_prints_and_writes_the_ece_before_and_after(digits_model_path, tmp_path, capsys):
    from ncguard.cli.evaluate import run

    args = argparse.Namespace(model=str(digits_model_path), id="digits:test", ood=["noise:uniform"], out_dir=str(tmp_path), all_scores=None, provider="cpu")
    assert run(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "evaluation.json").read_text())
    calibration = report["id"]["calibration"]
    assert calibration["n_bins"] == 15
    assert calibration["temperature"] == load_model(digits_model_path).metadata.temperature
    assert calibration["probabilities"]["ece"] < calibration["softmax"]["ece"]
    assert "ECE (15 bins)" in out
    assert f"{calibration['softmax']['ece']:.4f}" in out and f"{calibration['probabilities']['ece']:.4f}" in out
