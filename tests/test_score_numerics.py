"""Regression tests for the numerical findings of issue 15 (the pytorch-ood cross-check):
ViM's origin on a zero-sum head, Mahalanobis on zero-variance directions, NCI's alpha."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from sklearn.linear_model import LogisticRegression

from export.parity import compare_scores
from export.score_graph import append_ood_head
from ncguard.scores import make_detector
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
        detector = make_detector("vim").fit(stats, weight, bias + nudge)
        norms.append(np.linalg.norm(detector.origin_))
        scores.append(detector.score(features=queries, logits=queries @ weight.T + bias + nudge))
    np.testing.assert_allclose(norms, norms[0], rtol=1e-6)
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scores[2], scores[0], rtol=1e-6, atol=1e-6)
    # The origin is the minimum-norm point whose logits are constant: it lies in W's row space.
    detector = make_detector("vim").fit(stats, weight, bias + 1e-12)
    logits_at_origin = weight @ detector.origin_ + bias
    np.testing.assert_allclose(logits_at_origin, logits_at_origin.mean(), atol=1e-9)
    assert norms[0] < 10 * np.linalg.norm(bias) / np.linalg.svd(weight, compute_uv=False)[-2]


def test_vim_graph_keeps_parity_on_a_nudged_zero_sum_head():
    features, labels = clusters(seed=3)
    classifier = LogisticRegression(max_iter=2000).fit(features, labels)
    weight, bias = classifier.coef_, classifier.intercept_ + 1e-12
    detector = make_detector("vim").fit(ClassStatistics(10, bank_size=1024).fit(features, labels), weight, bias)
    session = score_graph(detector, 64, 10)
    queries = clusters(n=300, seed=4)[0]
    logits = queries @ weight.T + bias
    result = compare_scores("vim", detector.score(features=queries, logits=logits), graph_scores(session, queries, logits), width=64)
    assert result.worst_ratio < 0.1, result.describe()
