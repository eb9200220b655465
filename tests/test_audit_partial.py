"""Mergeable partial statistics of `ncguard audit`: merging equals one pass, and the distances equal
(PSI, JS, mean shift) or tightly bound (KS) the service's drift functions on the raw rows."""

from __future__ import annotations

import numpy as np
import pytest

from ncguard import drift
from ncguard.audit.partial import Binning, PartialStats, ks_bounds, psi_from_counts
from ncguard.model_file import DriftReference, ModelMetadata

N_CLASSES, DIM = 4, 6


def _metadata(reference_scores, seed=0) -> ModelMetadata:
    rng = np.random.default_rng(seed)
    return ModelMetadata(
        name="synthetic", classes=[f"c{i}" for i in range(N_CLASSES)], input_shape=[DIM], input_scale=1.0,
        score="etf", threshold=float(np.quantile(reference_scores, 0.95)), tpr=0.95,
        drift_reference=DriftReference(
            score_quantiles=drift.reference_quantiles(reference_scores, 100).tolist(),
            class_priors=(np.ones(N_CLASSES) / N_CLASSES).tolist(),
            feature_mean=rng.normal(size=DIM).tolist(), feature_std=rng.uniform(0.5, 2, size=DIM).tolist(),
        ),
        statistics_checksum="0" * 64,
    )


def _rows(rng, n, shift=0.0):
    scores = rng.normal(shift, 1.0, n)
    classes = rng.integers(0, N_CLASSES, n)
    labels = np.where(rng.random(n) < 0.7, classes, rng.integers(-1, N_CLASSES, n))
    features = rng.normal(shift, 1.0, (n, DIM))
    return classes, scores, labels, features


@pytest.mark.parametrize("shift", [0.0, 0.7, 3.0])
def test_merged_partials_equal_one_pass_and_the_drift_functions(shift):
    rng = np.random.default_rng(1)
    meta = _metadata(rng.normal(0, 1, 2000))
    binning = Binning.from_metadata(meta)
    classes, scores, labels, features = _rows(rng, 5000, shift)
    is_ood = scores > meta.threshold
    ids = [f"r{i}" for i in range(len(scores))]

    whole = PartialStats(binning).partial_fit(classes, scores, is_ood, features, labels, row_ids=ids, classes=meta.classes)
    pieces = np.array_split(rng.permutation(len(scores)), 7)
    parts = [
        PartialStats(binning).partial_fit(classes[p], scores[p], is_ood[p], features[p], labels[p], row_ids=[ids[i] for i in p], classes=meta.classes)
        for p in pieces
    ]
    merged = PartialStats(binning)
    for part in reversed(parts):  # any order; through JSON, as the engines ship them
        merged.merge(PartialStats.from_json(part.to_json(), binning))

    for name in ("rows_", "ood_", "labelled_", "correct_"):
        assert getattr(merged, name) == getattr(whole, name)
    for name in ("predicted_", "predicted_ood_", "label_", "label_ood_", "label_correct_", "buckets_", "fine_"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    np.testing.assert_allclose(merged.feature_sum_, features.sum(axis=0), rtol=1e-12)
    assert merged.top_ == whole.top_
    assert [e["row_id"] for e in merged.top_] == [ids[i] for i in np.argsort(-scores)[: len(merged.top_)]]

    reference = meta.drift_reference
    distances = merged.distances(meta)
    assert distances["ood_rate"] == pytest.approx(is_ood.mean(), abs=0)
    assert distances["score_psi"] == pytest.approx(drift.psi(scores, reference.score_quantiles), rel=1e-12, abs=1e-12)
    assert distances["class_js"] == pytest.approx(
        drift.js_distance(drift.class_distribution(classes, N_CLASSES), reference.class_priors), rel=1e-12
    )
    assert distances["feature_mean_shift"] == pytest.approx(
        drift.mean_shift(features.mean(axis=0), reference.feature_mean, reference.feature_std), rel=1e-10
    )
    exact_ks = drift.ks_distance(scores, reference.score_quantiles)
    assert distances["score_ks"] <= exact_ks + 1e-12 <= distances["score_ks_upper"] + 2e-12
    # the stated bound: the gap is at most the largest mass one fine bin holds
    assert distances["score_ks_upper"] - distances["score_ks"] <= max(merged.fine_.max() / merged.rows_, 2.0 / 4096) + 1e-12
    assert distances["score_ks_upper"] - distances["score_ks"] < 0.01


def test_ks_bounds_hold_for_point_masses_and_ties():
    """Scores piled on one value (saturated scores such as MSP at -1) and on reference knots."""
    rng = np.random.default_rng(2)
    reference_scores = np.concatenate([np.full(300, -1.0), rng.uniform(-1, 0, 700)])
    meta = _metadata(reference_scores)
    binning = Binning.from_metadata(meta)
    q = meta.drift_reference.score_quantiles
    for window in (np.full(50, -1.0), np.full(50, -0.5), np.concatenate([np.full(20, -1.0), rng.uniform(-1.5, 0.5, 80)]), np.asarray(q)):
        fine = np.bincount(np.searchsorted(binning.fine_edges, window, side="left"), minlength=binning.fine_edges.size + 1)
        lower, upper = ks_bounds(fine, binning.fine_edges, q)
        exact = drift.ks_distance(window, q)
        assert lower - 1e-12 <= exact <= upper + 1e-12
        assert psi_from_counts(fine, binning.fine_edges, q) == pytest.approx(drift.psi(window, q), rel=1e-12, abs=1e-12)


def test_rejections_and_time_buckets_merge():
    rng = np.random.default_rng(3)
    meta = _metadata(rng.normal(0, 1, 500))
    binning = Binning.from_metadata(meta)
    day = 86400
    a = PartialStats(binning).partial_fit([0, 1], [0.0, 5.0], [False, True], np.zeros((2, DIM)), [0, 0], timestamps=[0, day + 5]).reject("not_finite", 2)
    b = PartialStats(binning).partial_fit([1], [0.1], [False], np.zeros((1, DIM)), [1], timestamps=[day + 7]).reject("not_finite").reject("overflow")
    merged = PartialStats.from_json(a.to_json(), binning).merge(b)
    assert merged.rejected_ == {"not_finite": 3, "overflow": 1}
    assert merged.time_ == {"1970-01-01": [1, 0, 1, 1], "1970-01-02": [2, 1, 2, 1]}


def test_the_audit_imports_neither_ray_nor_torch():
    """Ray is imported by the ray engine only, torch never: the core stays light (ncguard[scale] is optional)."""
    import subprocess
    import sys

    code = (
        "import sys, ncguard.audit, ncguard.audit_cli, ncguard.audit.local, ncguard.audit.report; "
        "bad = sorted(m for m in ('ray', 'torch') if m in sys.modules); print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
