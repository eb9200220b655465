"""The conditional block score of benchmarks/quality/conditional_study.py (issue 16's study of block
statistics conditioned on the head's features): it must reduce to the plain Mahalanobis when it is
conditioned on nothing, and it must tell block statistics that the head features explain from ones
they do not."""

import numpy as np

from benchmarks.quality.conditional_study import BLOCK, conditional_block_score
from ncguard.scores import build_detector
from ncguard.stats import ClassStatistics, StatisticsBundle


def _data(rng, n=3000, classes=3, width=6, head=4):
    labels = rng.integers(0, classes, n)
    head_features = rng.normal(size=(n, head)) + 3.0 * np.eye(classes, head)[labels]
    mixing = rng.normal(size=(head, width))
    block = head_features @ mixing + 0.05 * rng.normal(size=(n, width))  # block3 almost fully explained by the head
    return {BLOCK: block, "detection": head_features}, labels, mixing


def _bundle(classes=3, width=6):
    stats = ClassStatistics(classes, per_class_covariance=False).fit(np.random.default_rng(9).normal(size=(30, width)), np.arange(30) % classes)
    return StatisticsBundle(layers={BLOCK: stats}, classes=tuple(f"c{i}" for i in range(classes)))


def test_conditioned_on_nothing_it_is_the_plain_mahalanobis():
    rng = np.random.default_rng(0)
    fit, labels, _ = _data(rng)
    stats = ClassStatistics(3, per_class_covariance=False).fit(fit[BLOCK], labels)
    plain_bundle = StatisticsBundle(layers={BLOCK: stats}, classes=("c0", "c1", "c2"))
    plain = build_detector("mahalanobis", plain_bundle, layer=BLOCK).fit(plain_bundle)
    probe, _, _ = _data(np.random.default_rng(1), n=200)
    conditional = conditional_block_score(fit, labels, _bundle(), ())
    np.testing.assert_allclose(conditional(probe), plain.score({BLOCK: probe[BLOCK]}), rtol=1e-6, atol=1e-6)


def test_it_scores_what_the_head_features_do_not_explain():
    rng = np.random.default_rng(0)
    fit, labels, mixing = _data(rng)
    score = conditional_block_score(fit, labels, _bundle(), ("detection",))
    unconditional = conditional_block_score(fit, labels, _bundle(), ())
    # Unusual head features with the block statistics they predict: far out for the plain Mahalanobis,
    # ordinary once conditioned. The same head features with block statistics they do not predict: far out for both.
    head = np.full((1, 4), 12.0)
    consistent = {BLOCK: head @ mixing, "detection": head}
    inconsistent = {BLOCK: head @ mixing + 2.0, "detection": head}
    typical = np.quantile(score(fit), 0.99)
    assert unconditional(consistent)[0] > 10 * np.quantile(unconditional(fit), 0.99)
    assert score(consistent)[0] < typical
    assert score(inconsistent)[0] > 10 * typical
