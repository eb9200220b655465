"""conditional-mahalanobis: block statistics scored given the head's features, from a bundle's joint
statistics. Held to an independent row-by-row fit (the study's), to its ONNX graph, and to `fused`."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ncguard.errors import ConfigError, DataError
from ncguard.scores import COMPONENT_SCORES, SCORES, build_detector, make_detector
from ncguard.scores.graph import GraphBuilder
from ncguard.stats import ClassStatistics, StatisticsBundle, joint_name

CLASSES, WIDTHS = 3, {"block3": 6, "detection": 4, "transfer": 3}
JOINT = joint_name(("block3", "detection", "transfer"))


def sample(rng, n):
    """Block statistics mostly explained by the head features, plus noise of their own."""
    labels = rng.integers(0, CLASSES, n)
    detection = rng.normal(size=(n, 4)) + 3.0 * np.eye(CLASSES, 4)[labels]
    transfer = np.abs(rng.normal(size=(n, 3))) + labels[:, None]
    mixing = np.random.default_rng(42).normal(size=(7, 6))
    block = np.c_[detection, transfer] @ mixing + 0.3 * rng.normal(size=(n, 6))
    return {"block3": block, "detection": detection, "transfer": transfer}, labels


@pytest.fixture(scope="module")
def fitted():
    features, labels = sample(np.random.default_rng(0), 4000)
    layers = {name: ClassStatistics(CLASSES, seed=1).fit(values, labels) for name, values in features.items()}
    joint = ClassStatistics(CLASSES, per_class_covariance=False, bank_size=0).fit(np.concatenate([features[k] for k in WIDTHS], axis=1), labels)
    bundle = StatisticsBundle(layers=layers, classes=("a", "b", "c"), joint={JOINT: joint})
    return bundle, features, labels


def test_it_is_a_fused_component_not_a_standard_score():
    assert "conditional-mahalanobis" in COMPONENT_SCORES and "conditional-mahalanobis" not in SCORES
    with pytest.raises(ConfigError, match="unknown score"):
        build_detector("conditional-mahalanobis", None)


def _row_by_row(features, labels, probe):
    """The textbook computation on the rows themselves: least squares with intercept, residual class
    means, tied within-class covariance of the residual, its inverse (no eigenvalue here is near the floor)."""
    head = lambda d: np.c_[d["detection"], d["transfer"], np.ones(len(d["block3"]))]
    coefficients, *_ = np.linalg.lstsq(head(features), features["block3"], rcond=None)
    residual = features["block3"] - head(features) @ coefficients
    means = np.stack([residual[labels == c].mean(axis=0) for c in range(CLASSES)])
    centred = residual - means[labels]
    precision = np.linalg.inv(centred.T @ centred / len(centred))
    r = probe["block3"] - head(probe) @ coefficients
    return np.min([(((r - m) @ precision) * (r - m)).sum(axis=1) for m in means], axis=0)


def test_it_agrees_with_a_regression_fitted_row_by_row(fitted):
    """From the streamed joint moments alone, the same score as regressing the fit rows themselves."""
    bundle, features, labels = fitted
    detector = make_detector("conditional-mahalanobis", layer="block3").fit(bundle)
    probe, _ = sample(np.random.default_rng(1), 300)
    probe["detection"][:50] += 4.0  # unusual head features too
    np.testing.assert_allclose(detector.score(probe), _row_by_row(features, labels, probe), rtol=1e-6)
    assert detector.layers == ("block3", "detection", "transfer")


def test_it_scores_what_the_head_does_not_explain(fitted):
    bundle, features, _ = fitted
    conditional = make_detector("conditional-mahalanobis", layer="block3").fit(bundle)
    plain = make_detector("mahalanobis", layer="block3").fit(bundle)
    probe, _ = sample(np.random.default_rng(2), 200)
    explained = {**probe, "detection": probe["detection"] * 4.0}
    mixing = np.random.default_rng(42).normal(size=(7, 6))
    explained["block3"] = np.c_[explained["detection"], explained["transfer"]] @ mixing  # block follows its head
    unexplained = {**probe, "block3": probe["block3"] + 3.0}
    typical = np.quantile(conditional.score(features), 0.99)
    assert np.median(plain.score(explained)) > 3 * np.quantile(plain.score(features), 0.99)
    assert np.median(conditional.score(explained)) < typical
    assert np.median(conditional.score(unexplained)) > 3 * typical


def test_clear_errors(fitted):
    bundle, features, _ = fitted
    without = StatisticsBundle(layers=bundle.layers, classes=bundle.classes)
    with pytest.raises(ConfigError, match="joint statistics 'block3\\+detection\\+transfer'.*mahalanobis"):
        make_detector("conditional-mahalanobis", layer="block3").fit(without)
    with pytest.raises(ConfigError, match="on itself"):
        make_detector("conditional-mahalanobis", layer="detection").fit(bundle)
    with pytest.raises(ConfigError, match="name the layer"):
        make_detector("conditional-mahalanobis").layers
    detector = make_detector("conditional-mahalanobis", layer="block3").fit(bundle)
    with pytest.raises(DataError, match="layer: features"):
        detector.score(features["block3"])
    with pytest.raises(DataError, match="transfer"):
        detector.score({"block3": features["block3"], "detection": features["detection"]})


def _graph_model(build, shape=("N",)):
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width]) for name, width in WIDTHS.items()]
    model = helper.make_model(helper.make_graph([], "g", inputs, []), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    builder = GraphBuilder(model.graph, 18)
    out = build(builder, {name: name for name in WIDTHS})
    model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(shape)))
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), out


@pytest.mark.parametrize("scale, offset, column", [(1.0, 0.0, False), (0.37, 1.5, True)])
def test_graph_matches_the_reference(fitted, scale, offset, column):
    bundle, _, _ = fitted
    detector = make_detector("conditional-mahalanobis", layer="block3").fit(bundle)
    session, out = _graph_model(lambda b, inputs: detector.build_graph(b, inputs, scale=scale, offset=offset, column=column),
                                ("N", 1) if column else ("N",))
    probe, _ = sample(np.random.default_rng(3), 256)
    graph = session.run([out], {k: v.astype(np.float32) for k, v in probe.items()})[0]
    expected = scale * detector.score(probe) - offset
    assert graph.shape == ((256, 1) if column else (256,))
    np.testing.assert_allclose(graph.reshape(-1), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_a_fused_component_reads_all_three_layers_and_exports(fitted):
    bundle, features, _ = fitted
    fused = build_detector("fused", bundle, components="block3:conditional-mahalanobis,detection:ddu-lowrank")
    assert fused.layers == ("block3", "detection", "transfer")
    held_out, _ = sample(np.random.default_rng(4), 500)
    fused.fit(bundle, held_out)
    probe, _ = sample(np.random.default_rng(5), 128)
    session, out = _graph_model(lambda b, inputs: fused.build_graph(b, inputs))
    graph = session.run([out], {k: v.astype(np.float32) for k, v in probe.items()})[0]
    np.testing.assert_allclose(graph, fused.score(probe), rtol=1e-3, atol=1e-3)


def test_bundles_keep_joint_statistics(tmp_path, fitted):
    bundle, _, _ = fitted
    bundle.save(tmp_path / "s.npz")
    loaded = StatisticsBundle.load(tmp_path / "s.npz")
    assert list(loaded.joint) == [JOINT]
    np.testing.assert_array_equal(loaded.joint[JOINT].covariance_, bundle.joint[JOINT].covariance_)
    with pytest.raises(DataError, match="must join layers of the bundle"):
        StatisticsBundle(layers={"block3": bundle.layers["block3"]}, classes=bundle.classes, joint=bundle.joint).save(tmp_path / "t.npz")
    with pytest.raises(DataError, match="at least two layer names"):
        joint_name(("block3",))
