"""The ONNX score graphs against the NumPy reference detectors, for every score (torch-free)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from sklearn.linear_model import LogisticRegression

from export.parity import SCORE_RTOL, compare_scores
from export.score_graph import append_ood_head
from ncguard.errors import ConfigError, ModelError
from ncguard.ood_metrics import auroc
from ncguard.scores import SCORES, make_detector, one_layer
from ncguard.scores.graph import GraphBuilder
from ncguard.stats import ClassStatistics

N_CLASSES, WIDTH = 5, 24


def collapsed_features(n, rng, spread=0.25):
    """Detection-head-like features: unit vectors scattered around C simplex directions."""
    directions = np.sqrt(N_CLASSES / (N_CLASSES - 1)) * (np.eye(N_CLASSES) - 1.0 / N_CLASSES)
    directions = np.c_[directions, np.zeros((N_CLASSES, WIDTH - N_CLASSES))]
    labels = np.r_[np.arange(N_CLASSES), rng.integers(0, N_CLASSES, n - N_CLASSES)]
    raw = directions[labels] + spread * rng.standard_normal((n, WIDTH)) / np.sqrt(WIDTH)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True), labels


@pytest.fixture(scope="module")
def setting():
    rng = np.random.default_rng(0)
    train, labels = collapsed_features(2000, rng)
    stats = ClassStatistics(N_CLASSES, bank_size=1000, seed=3).fit(train, labels)
    classifier = LogisticRegression(C=10.0, max_iter=2000).fit(train, labels)
    weight, bias = classifier.coef_, classifier.intercept_
    id_features = collapsed_features(300, rng)[0].astype(np.float32)
    ood_raw = rng.standard_normal((300, WIDTH))
    ood_features = (ood_raw / np.linalg.norm(ood_raw, axis=1, keepdims=True)).astype(np.float32)
    return stats, weight, bias, id_features, ood_features


def scoring_graph(opset: int) -> onnx.ModelProto:
    """A graph whose inputs are the features and the logits, and no nodes yet."""
    inputs = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", WIDTH]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES]),
    ]
    graph = helper.make_graph([], "scores", inputs, [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def run(model: onnx.ModelProto, **feeds) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(["ood_score"], {k: v for k, v in feeds.items() if k in wanted})[0]


def test_every_score_writes_its_graph_in_its_own_file():
    """The ONNX builder lives next to the NumPy formula: one file per score holds both."""
    for cls in SCORES.values():
        assert "_graph" in vars(cls) and "_score" in vars(cls), cls.__name__
        assert cls._graph.__module__ == cls._score.__module__ == cls.__module__


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("name", sorted(SCORES))
def test_graph_matches_reference_and_keeps_the_ranking(name, opset, setting):
    stats, weight, bias, id_features, ood_features = setting
    detector = make_detector(name).fit(one_layer(stats, weight, bias))
    model = append_ood_head(scoring_graph(opset), detector, features="features", logits="logits")
    for features in (id_features, ood_features):
        logits = (features.astype(np.float64) @ weight.T + bias).astype(np.float32)
        graph_scores = run(model, features=features, logits=logits)
        assert graph_scores.dtype == np.float32 and graph_scores.shape == (len(features),)
        reference = detector.score(features=features, logits=logits)
        result = compare_scores(name, reference, graph_scores, width=WIDTH)
        assert result.worst_ratio < 0.1, result.describe()  # 10x margin inside the tolerance
    id_logits = (id_features.astype(np.float64) @ weight.T + bias).astype(np.float32)
    ood_logits = (ood_features.astype(np.float64) @ weight.T + bias).astype(np.float32)
    reference_auroc = auroc(detector.score(features=id_features, logits=id_logits), detector.score(features=ood_features, logits=ood_logits))
    graph_auroc = auroc(run(model, features=id_features, logits=id_logits), run(model, features=ood_features, logits=ood_logits))
    assert abs(graph_auroc - reference_auroc) <= 1.0 / (len(id_features) * len(ood_features))  # at most one pair swapped


@pytest.mark.parametrize("name", ["etf", "mahalanobis", "knn", "vim", "ddu"])
def test_parity_check_catches_a_graph_built_from_other_statistics(name, setting):
    """The tolerance is tight enough to see a graph whose parameters are slightly off."""
    stats, weight, bias, id_features, _ = setting
    rng = np.random.default_rng(1)
    train, labels = collapsed_features(2000, rng, spread=0.3)
    other = ClassStatistics(N_CLASSES, bank_size=1000, seed=3).fit(train, labels)
    detector = make_detector(name).fit(one_layer(stats, weight, bias))
    wrong = append_ood_head(scoring_graph(18), make_detector(name).fit(one_layer(other, weight, bias)), features="features", logits="logits")
    logits = (id_features.astype(np.float64) @ weight.T + bias).astype(np.float32)
    with pytest.raises(ModelError, match="parity check failed"):
        compare_scores(name, detector.score(features=id_features, logits=logits), run(wrong, features=id_features, logits=logits), width=WIDTH)


@pytest.mark.parametrize("scale, offset", [(0.37, 1.5), (-2.0, -0.25)])
@pytest.mark.parametrize("name", sorted(set(SCORES) - {"fused"}))
def test_a_part_of_a_combination_is_scaled_shifted_and_a_column(name, scale, offset, setting):
    """build_graph(scale, offset, column=True) is scale * score - offset as [N, 1]: how `fused` reads
    its parts (Mahalanobis and low-rank DDU fold all three into their own nodes, the rest add them)."""
    stats, weight, bias, id_features, ood_features = setting
    detector = make_detector(name).fit(one_layer(stats, weight, bias))
    model = scoring_graph(18)
    builder = GraphBuilder(model.graph, 18)
    column = detector.build_graph(builder, {"features": "features", "logits": "logits"}, scale=scale, offset=offset, column=True)
    model.graph.output.append(helper.make_tensor_value_info(column, TensorProto.FLOAT, ["N", 1]))
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    for features in (id_features, ood_features):
        logits = (features.astype(np.float64) @ weight.T + bias).astype(np.float32)
        graph_scores = session.run([column], {k: v for k, v in {"features": features, "logits": logits}.items() if k in wanted})[0]
        assert graph_scores.shape == (len(features), 1)
        reference = scale * detector.score(features=features, logits=logits) - offset
        result = compare_scores(name, reference, graph_scores[:, 0], width=WIDTH)
        assert result.worst_ratio < 0.1, result.describe()


@pytest.mark.parametrize("options", [{}, {"scale": 0.37, "offset": 1.5, "column": True}])
def test_lowrank_ddu_below_full_rank_matches_its_reference(options, setting):
    """The residual term (rank < width: isotropic variance outside the shared subspace) in the graph;
    at the default rank 64 the fixtures' 24-wide features are full rank and have no residual."""
    stats, weight, bias, id_features, ood_features = setting
    detector = make_detector("ddu-lowrank", rank=4).fit(one_layer(stats))
    assert detector.residual_precisions_.min() > 0
    model = scoring_graph(18)
    tensor = detector.build_graph(GraphBuilder(model.graph, 18), {"features": "features"}, **options)
    model.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for features in (id_features, ood_features):
        logits = np.zeros((len(features), N_CLASSES), np.float32)  # an input of the graph, unread by this score
        graph_scores = session.run([tensor], {"features": features, "logits": logits})[0].reshape(-1)
        reference = options.get("scale", 1.0) * detector.score(features=features) - options.get("offset", 0.0)
        result = compare_scores("ddu-lowrank", reference, graph_scores, width=WIDTH)
        assert result.worst_ratio < 0.1, result.describe()


def test_the_default_combinations_parts_fold_into_few_nodes(setting):
    """At batch 1 each node costs a few microseconds whatever it computes (benchmarks/fused_cost.py), so the
    default's parts keep the node counts they were written with: Mahalanobis 5, low-rank DDU 13, and a
    part's standardization and column cost nothing extra (a regression guard, not a timing)."""
    stats = setting[0]
    for name, nodes in (("mahalanobis", 5), ("ddu-lowrank", 13)):
        detector = make_detector(name).fit(one_layer(stats))
        for options in ({}, {"scale": 0.5, "offset": 2.0, "column": True}):
            model = scoring_graph(18)
            detector.build_graph(GraphBuilder(model.graph, 18), {"features": "features"}, **options)
            assert len(model.graph.node) == nodes, (name, options)


def test_outputs_are_the_score_nodes_own_tensors(setting):
    """No Identity copies the score into `ood_score` or its parts into `ood_components` (one node each)."""
    stats, weight, bias = setting[:3]
    for name in ("mahalanobis", "msp"):
        model = append_ood_head(scoring_graph(18), make_detector(name).fit(one_layer(stats, weight, bias)), features="features", logits="logits")
        assert not [node for node in model.graph.node if node.op_type == "Identity"]
        assert {"ood_score", "ood_components"} <= {output for node in model.graph.node for output in node.output}


def test_tolerance_is_relative_to_the_scores_spread():
    reference = np.array([1.0, 2.0, 3.0])
    compare_scores("energy", reference, reference * (1 + SCORE_RTOL / 2))
    with pytest.raises(ModelError):
        compare_scores("energy", reference, reference * (1 + 3 * SCORE_RTOL))


def foreign_classifier(weight: np.ndarray, input_shape, opset: int) -> onnx.ModelProto:
    """A classifier as someone else might export it: its own tensor names, no OOD score."""
    n_classes, width = weight.shape
    nodes = [
        helper.make_node("Flatten", ["pixels"], ["embedding"], axis=1),
        helper.make_node("MatMul", ["embedding", "w"], ["class_logits"]),
        helper.make_node("Softmax", ["class_logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *input_shape])],
        [
            helper.make_tensor_value_info("class_logits", TensorProto.FLOAT, ["batch", n_classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_classes]),
        ],
        [onnx.numpy_helper.from_array(weight.T.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("name", ["mahalanobis", "vim"])
def test_head_appends_to_a_foreign_classifier(name, opset):
    """Bring your own model: a graph not written by ncguard keeps its outputs and gains ood_score."""
    rng = np.random.default_rng(2)
    input_shape = (1, 4, 4)
    weight = rng.normal(size=(3, 16))
    model = foreign_classifier(weight, input_shape, opset)
    x = rng.random((64, *input_shape)).astype(np.float32)
    features = x.reshape(64, -1).astype(np.float64)
    stats = ClassStatistics(3, bank_size=64).fit(features, (features @ weight.T).argmax(axis=1))
    detector = make_detector(name).fit(one_layer(stats, weight, np.zeros(3)))
    wrapped = append_ood_head(model, detector, features="embedding", logits="class_logits")
    onnx.checker.check_model(wrapped, full_check=True)
    assert [o.name for o in wrapped.graph.output] == ["class_logits", "probs", "ood_score", "ood_components"]
    assert wrapped.graph.output[2].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, score = session.run(["class_logits", "ood_score"], {"pixels": x})
    np.testing.assert_allclose(logits, features @ weight.T, rtol=1e-4, atol=1e-4)
    compare_scores(name, detector.score(features=features, logits=logits), score, width=16)
    assert len(model.graph.node) == 3  # the input model is left untouched


def test_half_precision_features_are_cast_and_any_rank_is_flattened(setting):
    stats, weight, bias, id_features, _ = setting
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["features16", "shape"], ["maps"])],
        "half",
        [helper.make_tensor_value_info("features16", TensorProto.FLOAT16, ["N", WIDTH])],
        [],
        [onnx.numpy_helper.from_array(np.array([-1, WIDTH, 1, 1], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    detector = make_detector("etf").fit(stats)
    wrapped = append_ood_head(model, detector, features="maps")
    half = id_features.astype(np.float16)
    scores = run(wrapped, features16=half)
    compare_scores("etf", detector.score(features=half.astype(np.float64)), scores, width=WIDTH)


def test_a_float_matrix_is_read_as_it_is(setting):
    """[N, width] float32 features and logits get no Flatten or Cast: at batch 1 every node costs time."""
    stats, *_ = setting
    for detector, tensors in ((make_detector("ddu-lowrank"), {"features": "features"}), (make_detector("energy"), {"logits": "logits"})):
        wrapped = append_ood_head(scoring_graph(18), detector.fit(stats), **tensors)
        assert not [n for n in wrapped.graph.node if n.op_type in ("Flatten", "Cast")], detector.name


def test_bad_requests_are_clear_errors(setting):
    stats, weight, bias, *_ = setting
    fitted = make_detector("etf").fit(stats)
    with pytest.raises(ConfigError, match="must be fitted"):
        append_ood_head(scoring_graph(18), make_detector("etf"), features="features")
    with pytest.raises(ModelError, match="no tensor named 'nope'"):
        append_ood_head(scoring_graph(18), fitted, features="nope")
    with pytest.raises(ConfigError, match="reads features"):
        append_ood_head(scoring_graph(18), fitted, logits="logits")
    with pytest.raises(ModelError, match="already has a tensor named 'logits'"):
        append_ood_head(scoring_graph(18), fitted, features="features", output="logits")
    with pytest.raises(ModelError, match="opset 12"):
        append_ood_head(scoring_graph(12), fitted, features="features")
