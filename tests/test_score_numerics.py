"""Regression tests for the numerical findings of issue 15 (the pytorch-ood cross-check):
ViM's origin on a zero-sum head, Mahalanobis on zero-variance directions, NCI's alpha."""

import numpy as np
import pytest
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from sklearn.linear_model import LogisticRegression

from export.parity import compare_scores
from export.score_graph import append_ood_head
from ncguard.errors import ConfigError
from ncguard.scores import make_detector, one_layer
from ncguard.stats import ClassStatistics


def clusters(n=3000, n_classes=10, width=64, seed=0):
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.normal(size=(n_classes, width))
    labels = np.r_[np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)]
    return means[labels] + rng.normal(size=(n, width)), labels


def score_graph(detector, width, n_classes):
    inputs = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes]),
    ]
    base = helper.make_model(helper.make_graph([], "scores", inputs, []), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = append_ood_head(base, detector, features="features", logits="logits")
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def graph_scores(session, features, logits):
    feeds = {"features": features.astype(np.float32), "logits": logits.astype(np.float32)}
    wanted = {i.name for i in session.get_inputs()}
    return session.run(["ood_score"], {k: v for k, v in feeds.items() if k in wanted})[0].astype(np.float64)


# ---------------------------------------------------------------------- ViM: zero-sum head


def test_vim_origin_ignores_round_off_on_a_zero_sum_head():
    """A multinomial logistic-regression head has rows summing to zero (rank C - 1): its smallest
    singular value is round-off. Adding 1e-12 to the bias (a shift of every logit, which changes no
    probability) moved ||u|| from 0.26 to 2356 with NumPy's default pinv cut-off; it must not move."""
    features, labels = clusters()
    classifier = LogisticRegression(max_iter=2000).fit(features, labels)
    weight, bias = classifier.coef_, classifier.intercept_
    assert np.abs(weight.sum(axis=0)).max() < 1e-12  # the head really is zero-sum
    stats = ClassStatistics(10, bank_size=len(features)).fit(features, labels)
    queries = clusters(n=400, seed=1)[0] + np.random.default_rng(2).normal(scale=3.0, size=(400, 64))

    scores, norms = [], []
    for nudge in (0.0, 1e-12, -1e-12):
        detector = make_detector("vim").fit(one_layer(stats, weight, bias + nudge))
        norms.append(np.linalg.norm(detector.origin_))
        scores.append(detector.score(features=queries, logits=queries @ weight.T + bias + nudge))
    np.testing.assert_allclose(norms, norms[0], rtol=1e-6)
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scores[2], scores[0], rtol=1e-6, atol=1e-6)
    # The origin is the minimum-norm point whose logits are constant: it lies in W's row space.
    detector = make_detector("vim").fit(one_layer(stats, weight, bias + 1e-12))
    logits_at_origin = weight @ detector.origin_ + bias
    np.testing.assert_allclose(logits_at_origin, logits_at_origin.mean(), atol=1e-9)
    assert norms[0] < 10 * np.linalg.norm(bias) / np.linalg.svd(weight, compute_uv=False)[-2]


def test_vim_graph_keeps_parity_on_a_nudged_zero_sum_head():
    features, labels = clusters(seed=3)
    classifier = LogisticRegression(max_iter=2000).fit(features, labels)
    weight, bias = classifier.coef_, classifier.intercept_ + 1e-12
    detector = make_detector("vim").fit(one_layer(ClassStatistics(10, bank_size=1024).fit(features, labels), weight, bias))
    session = score_graph(detector, 64, 10)
    queries = clusters(n=300, seed=4)[0]
    logits = queries @ weight.T + bias
    result = compare_scores("vim", detector.score(features=queries, logits=logits), graph_scores(session, queries, logits), width=64)
    assert result.worst_ratio < 0.1, result.describe()


# ---------------------------------------------------------------------- Mahalanobis: zero-variance directions


def digits_pixels():
    from ncguard.data import load_dataset

    train, test = load_dataset("digits:train"), load_dataset("digits:test")
    return train.x.reshape(len(train), -1).astype(np.float64), train.y, test.x.reshape(len(test), -1).astype(np.float64)


def test_mahalanobis_counts_a_pixel_never_lit_in_training():
    """Raw 8x8 digits pixels: some are 0 in every training digit. Lighting one in the test digits must
    raise the score (the floor); the pseudo-inverse ignored it and scored them exactly as before."""
    from ncguard.ood_metrics import auroc

    x_train, y_train, x_test = digits_pixels()
    never_lit = np.flatnonzero(x_train.max(axis=0) == 0.0)
    assert never_lit.size >= 1
    lit = x_test.copy()
    lit[:, never_lit[0]] = 1.0
    stats = ClassStatistics(10).fit(x_train, y_train)

    floored = make_detector("mahalanobis").fit(stats)
    assert floored.eigenvalue_floor == 1e-6
    assert auroc(floored.score(features=x_test), floored.score(features=lit)) == 1.0
    assert floored.score(features=lit).min() > 10 * floored.score(features=x_test).max()

    ignoring = make_detector("mahalanobis", eigenvalue_floor=0.0).fit(stats)  # the former pseudo-inverse
    np.testing.assert_allclose(ignoring.score(features=lit), ignoring.score(features=x_test), rtol=1e-9)
    np.testing.assert_array_equal(ignoring.precision_, stats.precision_)

    # The graph computes the same, lit pixel included (float32 features, the export parity tolerance).
    session = score_graph(floored, 64, 10)
    for features in (x_test, lit):
        reference = floored.score(features=features)
        result = compare_scores("mahalanobis", reference, graph_scores(session, features, np.zeros((len(features), 10))), width=64)
        assert result.worst_ratio < 0.1, result.describe()


def test_mahalanobis_floor_leaves_well_conditioned_covariances_alone():
    features, labels = clusters(n=2000, width=16)
    stats = ClassStatistics(10).fit(features, labels)
    queries = clusters(n=200, width=16, seed=5)[0]
    floored = make_detector("mahalanobis").fit(stats).score(features=queries)
    np.testing.assert_allclose(floored, make_detector("mahalanobis", eigenvalue_floor=0.0).fit(stats).score(features=queries), rtol=1e-9)
    for bad in (-1e-6, 1.0, "1e-6", True):
        with pytest.raises(ConfigError, match="eigenvalue_floor"):
            make_detector("mahalanobis", eigenvalue_floor=bad).fit(stats)
    zero = ClassStatistics(2).fit(np.ones((4, 3)), np.array([0, 0, 1, 1]))  # no spread at all: every distance 0
    np.testing.assert_array_equal(make_detector("mahalanobis").fit(zero).score(features=np.zeros((2, 3))), 0.0)


# ---------------------------------------------------------------------- NCI: alpha


def test_nci_alpha_defaults_to_zero_and_the_scale_matched_rule_is_opt_in():
    """alpha = 0 by default (NCI docstring: the ID-set rule lost on every model measured). The case
    that decided it, reproduced: ReLU features whose OOD inputs have *larger* L1 norms than ID ones,
    as noise and Fashion-MNIST have on the plain digits CNN; the filter then pulls OOD toward ID."""
    from ncguard.ood_metrics import auroc

    rng = np.random.default_rng(6)
    features, labels = clusters(n=3000, n_classes=5, width=32, seed=6)
    features = np.maximum(features + 2.0, 0.0)  # non-negative, like post-ReLU features
    classifier = LogisticRegression(max_iter=2000).fit(features, labels)
    weight, bias = classifier.coef_, classifier.intercept_
    stats = ClassStatistics(5, bank_size=2048).fit(features, labels)
    id_queries = np.maximum(clusters(n=500, n_classes=5, width=32, seed=7)[0] + 2.0, 0.0)
    ood_queries = np.maximum(rng.normal(loc=3.0, scale=2.0, size=(500, 32)), 0.0)  # more activation overall
    assert np.abs(ood_queries).sum(axis=1).mean() > np.abs(id_queries).sum(axis=1).mean()

    def separation(detector):
        ids = detector.score(features=id_queries, logits=id_queries @ weight.T + bias)
        oods = detector.score(features=ood_queries, logits=ood_queries @ weight.T + bias)
        return auroc(ids, oods)

    default = make_detector("nci").fit(one_layer(stats, weight, bias))
    matched = make_detector("nci", alpha="scale-matched").fit(one_layer(stats, weight, bias))
    assert default.alpha_ == 0.0 and matched.alpha_ > 0.0
    assert separation(default) > separation(matched) + 0.05
    with pytest.raises(ConfigError, match="scale-matched"):
        make_detector("nci", alpha="auto").fit(one_layer(stats, weight, bias))
