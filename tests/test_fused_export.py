"""`ncguard export --score fused` on the session's real digits run: parity, threshold, metadata, CLI errors."""

import argparse

import numpy as np
import pytest

from export.cli import run_export
from export.run import export_run
from export.parity import compare_scores
from ncguard.calibration import calibrate_threshold
from ncguard.data import load_dataset
from ncguard.errors import ConfigError
from ncguard.model_file import load_model
from ncguard.ood_data import load_ood_dataset
from ncguard.ood_metrics import auroc
from ncguard.runtime import Predictor
from ncguard.scores import build_detector
from training.inference import fit_on_held_out, iter_layer_features
from training.runs import calibration_inputs, load_run


def _features(model, x, layers):
    parts = {name: [] for name in (*layers, "logits")}
    for _, features in iter_layer_features(model, x, (*layers, "logits")):
        for name, value in features.items():
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


@pytest.fixture(scope="module")
def fused_export(digits_run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "fused.onnx"
    path, report = export_run(str(digits_run_dir), str(out), score="fused", provider="cpu")
    return path, report


def test_default_fused_export_matches_the_reference(fused_export, digits_run_dir):
    path, report = fused_export
    model, config, bundle = load_run(digits_run_dir)
    assert {"block1", "block2", "block3"} <= set(bundle.layers)  # the default --layers of a new run
    meta = load_model(path).metadata
    assert meta.score == "fused" and report.score == "fused"
    fused_meta = meta.extra["fused"]
    expected = [["block3", "mahalanobis"], ["detection", "ddu-lowrank"]]  # default_fused on 1,212 fit rows: the last block, low-rank DDU, summed
    assert [[c["layer"], c["score"]] for c in fused_meta["components"]] == expected
    assert fused_meta["combine"] == "sum" and meta.extra["score_layer"] == ["block3", "detection"]
    assert all(c["sigma"] > 0 for c in fused_meta["components"])

    # The NumPy reference, fitted the same way on the same held-out split, on torch's features.
    calibration_x, _ = calibration_inputs(config)
    layers = ("block1", "block2", "block3", "detection")
    held_out = _features(model, calibration_x, layers)
    reference = fit_on_held_out(build_detector("fused", bundle), bundle, model, calibration_x)
    np.testing.assert_allclose([c["mu"] for c in fused_meta["components"]], reference.mu_, rtol=1e-12)
    assert meta.threshold == pytest.approx(calibrate_threshold(reference.score(held_out), 0.95), rel=1e-3)

    id_data = load_dataset("digits:test")
    noise = load_ood_dataset("noise:uniform", id_data).x[:200]
    inverted = load_ood_dataset("inverted:digits:test", id_data).x
    predictor = Predictor(path, provider="cpu")  # what serving runs: the ood_score output and the threshold
    scores = {}
    for what, x in (("id", id_data.x), ("noise", noise), ("inverted", inverted)):
        graph = predictor.predict(x).ood_score
        features = _features(model, x, layers)
        expected_scores = reference.score(features)
        width = sum(features[layer].shape[1] for layer in reference.layers)
        result = compare_scores("fused", expected_scores, graph, width=width)
        assert result.worst_ratio <= 1.0, result.describe()
        scores[what] = graph
    assert np.mean(scores["id"] <= meta.threshold) > 0.85
    assert auroc(scores["id"], scores["noise"]) > 0.95 and auroc(scores["id"], scores["inverted"]) > 0.9


def test_components_and_combine_flags(digits_run_dir, tmp_path, capsys):
    args = argparse.Namespace(
        run_dir=str(digits_run_dir), out=str(tmp_path / "max.onnx"), score="fused", tpr=0.9, provider="cpu",
        bentoml=None, components="detection:etf,block1:mahalanobis,logits:energy", combine="max",
    )
    assert run_export(args) == 0
    printed = capsys.readouterr().out
    assert "score fused on layer detection+block1" in printed and "parity: the 'fused' OOD score" in printed
    meta = load_model(tmp_path / "max.onnx").metadata
    assert meta.extra["fused"]["combine"] == "max" and meta.tpr == 0.9
    assert [(c["layer"], c["score"]) for c in meta.extra["fused"]["components"]] == [
        ("detection", "etf"), ("block1", "mahalanobis"), ("logits", "energy")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"score": "fused", "components": "block7:mahalanobis"}, "no layer 'block7'"),
        ({"score": "fused", "components": "block1:nosuch"}, "unknown score 'nosuch'"),
        ({"score": "fused", "components": "block1"}, "LAYER:SCORE"),
        ({"score": "fused", "components": "block1:mahalanobis,block1:mahalanobis"}, "listed twice"),
        ({"score": "fused", "combine": "mean"}, "combine must be one of"),
        ({"score": "fused", "layer": "block1"}, "--layer does not apply"),
        ({"score": "etf", "components": "block1:mahalanobis"}, "apply to --score fused only"),
        ({"score": "fusd"}, "unknown score 'fusd'"),
    ],
)
def test_bad_fused_options_are_clear_errors(digits_run_dir, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        export_run(str(digits_run_dir), str(tmp_path / "x.onnx"), provider="cpu", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


def test_a_run_streams_the_joint_statistics_and_exports_the_conditional_block(digits_run_dir, tmp_path):
    """`ncguard train` streams block3's joint statistics with the head layers; `ncguard export --components
    block3:conditional-mahalanobis,...` writes it (Concat + the Mahalanobis graph) and its parity check passes."""
    model, config, bundle = load_run(digits_run_dir)
    assert list(bundle.joint) == ["block3+detection+transfer"]
    joint = bundle.joint["block3+detection+transfer"]
    assert joint.means_.shape[1] == sum(bundle.layers[name].means_.shape[1] for name in ("block3", "detection", "transfer"))
    np.testing.assert_allclose(joint.means_[:, : bundle.layers["block3"].means_.shape[1]], bundle.layers["block3"].means_, rtol=1e-9, atol=1e-9)
    components = "block3:conditional-mahalanobis,detection:ddu-lowrank"
    path, report = export_run(str(digits_run_dir), str(tmp_path / "conditional.onnx"), score="fused", components=components, provider="cpu")
    meta = load_model(path).metadata
    assert [[c["layer"], c["score"]] for c in meta.extra["fused"]["components"]] == [["block3", "conditional-mahalanobis"], ["detection", "ddu-lowrank"]]
    assert meta.extra["score_layer"] == ["block3", "detection", "transfer"]
    calibration_x, _ = calibration_inputs(config)
    reference = fit_on_held_out(build_detector("fused", bundle, components=components), bundle, model, calibration_x)
    x = load_dataset("digits:test").x
    features = _features(model, x, ("block3", "detection", "transfer"))
    graph = Predictor(path, provider="cpu").predict(x).ood_score
    result = compare_scores("fused", reference.score(features), graph, width=sum(features[k].shape[1] for k in reference.layers))
    assert result.worst_ratio <= 1.0, result.describe()
    # The same parts added as one density (the default's combine on large training sets): its parity check passes
    # in export and the metadata carries the weights; digits' 1,212 fit rows are too few for that default itself.
    assert build_detector("fused", bundle).components == (("block3", "mahalanobis"), ("detection", "ddu-lowrank"))
    path, _ = export_run(str(digits_run_dir), str(tmp_path / "joint.onnx"), score="fused", components=components, combine="joint", provider="cpu")
    fused_meta = load_model(path).metadata.extra["fused"]
    assert fused_meta["combine"] == "joint"
    weights = [c["weight"] for c in fused_meta["components"]]
    assert np.mean(weights) == pytest.approx(1.0) and not np.allclose(weights, 1.0)
