"""OOD separation metrics, pinned to sklearn.metrics on random and tied data, and their plots."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn import metrics as skm

from ncguard.errors import ConfigError, DataError
from ncguard.ood_metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_report, roc_curve
from ncguard.plots import plot_roc_curves, plot_score_histograms


def labelled(id_scores, ood_scores):
    """OOD = 1, the convention of ncguard.ood_metrics."""
    labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return labels, np.r_[id_scores, ood_scores]


def sklearn_fpr_at_tpr(id_scores, ood_scores, tpr):
    """FPR of the first ROC point (ID positive, score negated) whose TPR reaches `tpr`."""
    labels, scores = labelled(id_scores, ood_scores)
    fpr, tpr_curve, _ = skm.roc_curve(1 - labels, -scores, drop_intermediate=False)
    return fpr[np.searchsorted(tpr_curve, tpr, side="left")]


def assert_matches_sklearn(id_scores, ood_scores, tpr=0.95):
    labels, scores = labelled(id_scores, ood_scores)
    assert auroc(id_scores, ood_scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert aupr_out(id_scores, ood_scores) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)
    assert aupr_in(id_scores, ood_scores) == pytest.approx(skm.average_precision_score(1 - labels, -scores), abs=1e-12)
    assert fpr_at_tpr(id_scores, ood_scores, tpr) == pytest.approx(sklearn_fpr_at_tpr(id_scores, ood_scores, tpr))


@pytest.mark.parametrize("seed", range(5))
def test_random_continuous_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(0.0, 1.0, size=rng.integers(20, 400))
    ood_scores = rng.normal(rng.uniform(-1, 2), rng.uniform(0.5, 2), size=rng.integers(20, 400))
    assert_matches_sklearn(id_scores, ood_scores, tpr=rng.uniform(0.05, 0.99))


@settings(max_examples=60, deadline=None)
@given(
    id_scores=st.lists(st.integers(0, 6), min_size=1, max_size=40),
    ood_scores=st.lists(st.integers(0, 6), min_size=1, max_size=40),
    tpr=st.floats(0.01, 0.99),
)
def test_heavily_tied_scores_match_sklearn(id_scores, ood_scores, tpr):
    assert_matches_sklearn(np.array(id_scores, float), np.array(ood_scores, float), tpr)


def test_roc_curve_matches_sklearn_points():
    rng = np.random.default_rng(7)
    id_scores, ood_scores = rng.integers(0, 10, 60).astype(float), rng.integers(3, 15, 50).astype(float)
    labels, scores = labelled(id_scores, ood_scores)
    expected_fpr, expected_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr, thresholds = roc_curve(id_scores, ood_scores)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)


def test_hand_checked_auroc_with_a_tie():
    # OOD 2 beats ID 0 and 1, ties ID 2 (1/2), loses to 3; OOD 5 beats all four: (2.5 + 4) / 8.
    assert auroc([0, 1, 2, 3], [2, 5]) == pytest.approx(6.5 / 8)


def test_fpr_at_tpr_counts_ood_tied_with_threshold_as_accepted():
    id_scores = np.arange(20.0)  # keeping 95% of 20 ID inputs puts the threshold at 18
    ood_scores = np.array([18.0, 18.5, 19.0, 30.0])  # only the tie at 18 is accepted as ID
    assert fpr_at_tpr(id_scores, ood_scores, 0.95) == pytest.approx(0.25)
    assert fpr_at_tpr(id_scores, ood_scores, 0.5) == pytest.approx(0.0)


def test_perfect_and_inverted_separation():
    id_scores, ood_scores = np.linspace(0, 1, 50), np.linspace(2, 3, 30)
    assert ood_report(id_scores, ood_scores) == pytest.approx(
        {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "n_id": 50, "n_ood": 30}
    )
    assert auroc(ood_scores, id_scores) == 0.0
    assert fpr_at_tpr(ood_scores, id_scores) == 1.0


def test_report_is_consistent_with_the_single_metrics():
    rng = np.random.default_rng(3)
    id_scores, ood_scores = rng.normal(size=100), rng.normal(1, size=70)
    report = ood_report(id_scores, ood_scores, tpr=0.9)
    assert report["auroc"] == auroc(id_scores, ood_scores)
    assert report["fpr95"] == fpr_at_tpr(id_scores, ood_scores, 0.9)
    assert (report["n_id"], report["n_ood"]) == (100, 70)
    assert all(type(value) in (float, int) for value in report.values())


@pytest.mark.parametrize("metric", [auroc, fpr_at_tpr, aupr_in, aupr_out, ood_report])
@pytest.mark.parametrize(
    "bad, message",
    [([], "empty"), ([0.1, np.nan], "NaN"), ([[0.1, 0.2]], "1-D"), (["a", "b"], "numbers"), ([1.0, np.inf], "infinite")],
)
def test_bad_scores_raise_data_error_naming_the_problem(metric, bad, message):
    with pytest.raises(DataError, match=message):
        metric([0.1, 0.2, 0.3], bad)
    with pytest.raises(DataError, match=message):
        metric(bad, [0.1, 0.2, 0.3])


@pytest.mark.parametrize("tpr", [0.0, 1.0, 1.5, -0.1])
def test_fpr_at_tpr_rejects_target_outside_unit_interval(tpr):
    with pytest.raises(ConfigError, match="tpr"):
        fpr_at_tpr([0.1, 0.2], [0.3], tpr)


def assert_valid_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def test_score_histogram_and_roc_plots_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    id_scores = rng.normal(size=300)
    ood_sets = {"shifted": rng.normal(2, size=200), "wide": rng.normal(0, 3, size=150)}
    histogram = plot_score_histograms(id_scores, ood_sets, threshold=1.6, path=tmp_path / "plots" / "hist.png")
    roc = plot_roc_curves(id_scores, ood_sets, tmp_path / "roc.png")
    assert histogram == str(tmp_path / "plots" / "hist.png")
    assert_valid_png(histogram)
    assert_valid_png(roc)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []


def test_plots_reject_missing_ood_sets(tmp_path):
    with pytest.raises(DataError, match="ood_sets"):
        plot_roc_curves([0.1, 0.2], {}, tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()
