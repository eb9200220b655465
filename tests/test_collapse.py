"""NC1-NC4 on exact simplex ETFs (all zero), random features (large) and hand-checked cases."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ncguard.collapse import (
    COLLAPSE_METRICS,
    NearestMeanAgreement,
    collapse_report,
    format_collapse_table,
    nc1,
    nc2,
    nc3,
)
from ncguard.errors import DataError
from ncguard.plots import plot_collapse
from ncguard.stats import ClassStatistics

NC2_KEYS = {
    "equinorm_means",
    "equinorm_weights",
    "equiangular_means_std",
    "equiangular_means_max_dev",
    "equiangular_weights_std",
    "equiangular_weights_max_dev",
}


def simplex_etf_means(n_classes, dim, seed=0, scale=3.0):
    """Class means forming a rotated, scaled, shifted simplex ETF in R^dim; returns (means, global mean)."""
    rng = np.random.default_rng(seed)
    etf = np.sqrt(n_classes / (n_classes - 1)) * (np.eye(n_classes) - 1.0 / n_classes)  # rows: ETF vertices
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    global_mean = rng.normal(size=dim)
    means = global_mean + scale * etf @ rotation[:n_classes]
    return means, global_mean


def moments_of(features, labels, n_classes):
    """Class means, count-weighted global mean and tied within-class covariance, with plain NumPy."""
    means = np.stack([features[labels == c].mean(axis=0) for c in range(n_classes)])
    centred = features - means[labels]
    return means, features.mean(axis=0), np.cov(centred, rowvar=False, bias=True)


def random_classification(n_classes=5, dim=12, n=600, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), np.arange(n) % n_classes


# ---------------------------------------------------------------- exact collapse: every metric is 0


@pytest.mark.parametrize("n_classes, dim", [(2, 2), (4, 6), (10, 10), (10, 32)])
def test_exact_simplex_etf_is_fully_collapsed(n_classes, dim):
    means, global_mean = simplex_etf_means(n_classes, dim)
    weight = 0.5 * (means - global_mean)  # classifier rows along the centred means (self-dual)
    assert nc1(np.zeros((dim, dim)), means, global_mean) == pytest.approx(0.0, abs=1e-12)
    terms = nc2(means, global_mean, weight)
    assert set(terms) == NC2_KEYS
    assert all(value == pytest.approx(0.0, abs=1e-10) for value in terms.values())
    assert nc3(means, global_mean, weight) == pytest.approx(0.0, abs=1e-12)

    features = np.repeat(means, 7, axis=0)  # zero within-class spread
    predictions = np.repeat(np.arange(n_classes), 7)
    agreement = NearestMeanAgreement(means).partial_fit(features, predictions).finalize()
    assert agreement.mismatch_ == 0.0


def test_collapse_report_of_a_collapsed_layer_is_all_zero():
    means, global_mean = simplex_etf_means(4, 8, seed=2)
    stats = SimpleNamespace(
        means_=means, global_mean_=global_mean, covariance_=np.zeros((8, 8)), counts_=np.full(4, 25)
    )
    agreement = NearestMeanAgreement(means).partial_fit(np.repeat(means, 3, axis=0), np.repeat(np.arange(4), 3))
    report = collapse_report(stats, weight=means - global_mean, nc4=agreement)  # finalize is done for us
    assert {key for key, _ in COLLAPSE_METRICS} <= set(report)
    assert all(report[key] == pytest.approx(0.0, abs=1e-10) for key, _ in COLLAPSE_METRICS)
    assert (report["n_classes"], report["dim"], report["n_samples"]) == (4, 8, 100)


# ---------------------------------------------------------------- no collapse: clearly large values


def test_random_features_and_classifier_are_far_from_collapse():
    features, labels = random_classification(n_classes=5, dim=12, n=600)
    means, global_mean, within = moments_of(features, labels, 5)
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(5, 12))
    # Random labels: class means differ only by sampling noise, so within-class spread dominates.
    assert nc1(within, means, global_mean) > 10.0
    terms = nc2(means, global_mean, weight)
    assert terms["equiangular_means_max_dev"] > 0.05 and terms["equiangular_weights_max_dev"] > 0.05
    assert terms["equinorm_weights"] > 0.02
    assert nc3(means, global_mean, weight) > 0.5
    random_predictions = rng.integers(0, 5, size=600)
    agreement = NearestMeanAgreement(means).partial_fit(features, random_predictions).finalize()
    assert agreement.mismatch_ > 0.5


# ---------------------------------------------------------------- hand-checked small cases


def test_nc1_hand_case_ignores_spread_orthogonal_to_the_means():
    # Means +-e1: Sigma_B = e1 e1^T, so only the e1 variance (0.5) counts: NC1 = 0.5 / C = 0.25.
    means = np.array([[1.0, 0.0], [-1.0, 0.0]])
    within = np.diag([0.5, 7.0])
    assert nc1(within, means, np.zeros(2)) == pytest.approx(0.25)


def test_nc1_equals_the_pinv_formula_on_a_generic_case():
    rng = np.random.default_rng(4)
    means, global_mean = rng.normal(size=(5, 8)), rng.normal(size=8)
    root = rng.normal(size=(8, 8))
    within = root @ root.T
    centred = means - global_mean
    between = centred.T @ centred / 5
    expected = np.trace(within @ np.linalg.pinv(between)) / 5
    assert nc1(within, means, global_mean) == pytest.approx(expected, rel=1e-9)


def test_nc2_hand_case():
    # Centred means e1, e2, -e1 (global mean 0): cosines 0, -1, 0; norms 1, 1, 1.
    means = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    weight = np.array([[3.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])  # norms 3, 1, 2: std sqrt(2/3), mean 2
    terms = nc2(means, np.zeros(2), weight)
    assert terms["equinorm_means"] == pytest.approx(0.0)
    assert terms["equiangular_means_std"] == pytest.approx(np.sqrt(2) / 3)
    assert terms["equiangular_means_max_dev"] == pytest.approx(0.5)  # |0 + 1/2|, |-1 + 1/2|, |0 + 1/2|
    assert terms["equinorm_weights"] == pytest.approx(np.sqrt(2 / 3) / 2)
    assert terms["equiangular_weights_std"] == pytest.approx(np.sqrt(2) / 3)


def test_nc2_without_weight_leaves_weight_terms_empty():
    terms = nc2(np.eye(3), np.zeros(3))
    assert terms["equinorm_weights"] is None and terms["equiangular_weights_max_dev"] is None
    assert terms["equinorm_means"] == pytest.approx(0.0)


def test_nc3_hand_cases():
    means = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    global_mean = np.array([0.5, 0.5])
    centred = means - global_mean
    assert nc3(means, global_mean, 10 * centred) == pytest.approx(0.0, abs=1e-12)  # scale does not matter
    assert nc3(means, global_mean, -centred) == pytest.approx(4.0)  # opposite direction: |2 u|^2
    orthogonal = centred @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # every row rotated by 90 degrees
    assert nc3(means, global_mean, orthogonal) == pytest.approx(2.0)  # |u - v|^2 with u . v = 0


def test_nearest_mean_agreement_hand_case_and_chunking():
    means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = np.array([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [6.0, 0.0]])  # nearest: 0, 1, 2, 1
    predictions = np.array([0, 1, 1, 0])  # disagrees on the last two
    whole = NearestMeanAgreement(means).partial_fit(features, predictions).finalize()
    assert whole.mismatch_ == pytest.approx(0.5)
    chunked = NearestMeanAgreement(means)
    for start in range(0, 4, 3):
        chunked.partial_fit(features[start : start + 3], predictions[start : start + 3])
    assert chunked.finalize().mismatch_ == whole.mismatch_
    assert (chunked.n_samples_seen_, chunked.n_mismatches_) == (4, 2)


def test_nearest_mean_agreement_stores_only_in_init_and_checks_input():
    agreement = NearestMeanAgreement("not even an array")
    assert not hasattr(agreement, "n_samples_seen_")
    with pytest.raises(DataError, match="means"):
        agreement.partial_fit(np.zeros((2, 2)), [0, 1])
    agreement = NearestMeanAgreement(np.eye(3))
    with pytest.raises(DataError, match="no samples"):
        agreement.finalize()
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        agreement.partial_fit(np.zeros((2, 3)), [0, 3])
    with pytest.raises(DataError, match="one class index per feature row"):
        agreement.partial_fit(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(DataError, match="dimensions"):
        agreement.partial_fit(np.zeros((2, 4)), [0, 1])
    with pytest.raises(DataError, match="integer"):
        agreement.partial_fit(np.zeros((2, 3)), [0.0, 1.0])


# ---------------------------------------------------------------- streamed moments


def test_streamed_class_statistics_give_the_same_metrics_as_numpy_moments():
    rng = np.random.default_rng(5)
    n_classes, dim = 4, 6
    centres = 4 * rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, size=900)
    features = centres[labels] + rng.normal(size=(900, dim)) * rng.uniform(0.5, 2.0, size=dim)
    weight = rng.normal(size=(n_classes, dim))

    stats = ClassStatistics(n_classes)
    for start in range(0, 900, 128):
        stats.partial_fit(features[start : start + 128], labels[start : start + 128])
    streamed = collapse_report(stats.finalize(), weight=weight)

    means, global_mean, within = moments_of(features, labels, n_classes)
    assert streamed["nc1"] == pytest.approx(nc1(within, means, global_mean), rel=1e-9)
    assert streamed["nc3"] == pytest.approx(nc3(means, global_mean, weight), rel=1e-9)
    for key, value in nc2(means, global_mean, weight).items():
        assert streamed[key] == pytest.approx(value, rel=1e-9)
    assert streamed["n_samples"] == 900 and streamed["nc4"] is None


def test_collapse_sharpens_as_within_class_noise_shrinks():
    means, _ = simplex_etf_means(5, 8, seed=3)
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(5), 200)
    values = []
    for noise in (1.0, 0.3, 0.03):
        features = means[labels] + noise * rng.normal(size=(1000, 8))
        class_means, global_mean, within = moments_of(features, labels, 5)
        values.append(nc1(within, class_means, global_mean))
    assert values[0] > values[1] > values[2] > 0


# ---------------------------------------------------------------- errors


def test_bad_shapes_and_degenerate_means_raise_data_error():
    with pytest.raises(DataError, match="at least 2 classes"):
        nc1(np.eye(2), np.ones((1, 2)), np.zeros(2))
    with pytest.raises(DataError, match="global_mean"):
        nc1(np.eye(2), np.eye(2), np.zeros(3))
    with pytest.raises(DataError, match="within_cov"):
        nc1(np.eye(3), np.eye(2), np.zeros(2))
    with pytest.raises(DataError, match="coincide"):
        nc1(np.eye(2), np.ones((3, 2)), np.ones(2))
    with pytest.raises(DataError, match="weight"):
        nc3(np.eye(3), np.zeros(3), np.ones((3, 2)))
    with pytest.raises(DataError, match="NaN"):
        nc2(np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros(2))


def test_collapse_report_names_missing_attributes_and_empty_classes():
    with pytest.raises(DataError, match="covariance_"):
        collapse_report(SimpleNamespace(means_=np.eye(2), global_mean_=np.zeros(2), counts_=[1, 1]))
    stats = SimpleNamespace(means_=np.eye(3), global_mean_=np.zeros(3), covariance_=np.eye(3), counts_=[4, 0, 2])
    with pytest.raises(DataError, match=r"\[1\]"):
        collapse_report(stats)


# ---------------------------------------------------------------- table and plot


def example_reports():
    means, global_mean = simplex_etf_means(4, 6, seed=1)
    collapsed = SimpleNamespace(means_=means, global_mean_=global_mean, covariance_=1e-4 * np.eye(6), counts_=[9] * 4)
    features, labels = random_classification(n_classes=4, dim=6, n=200)
    spread_means, spread_global, spread_within = moments_of(features, labels, 4)
    spread = SimpleNamespace(means_=spread_means, global_mean_=spread_global, covariance_=spread_within, counts_=[50] * 4)
    return {
        "detection": collapse_report(collapsed, weight=means - global_mean),
        "transfer_long_layer_name": collapse_report(spread),
    }


def test_table_lists_every_metric_per_layer_aligned():
    reports = example_reports()
    table = format_collapse_table(reports)
    lines = table.splitlines()
    assert "detection" in lines[0] and "transfer_long_layer_name" in lines[0]
    assert len(lines) == 2 + len(COLLAPSE_METRICS)
    assert len({len(line) for line in lines}) == 1  # right-aligned columns end at the same place
    nc1_line = next(line for line in lines if line.startswith("NC1"))
    assert f"{reports['transfer_long_layer_name']['nc1']:.4g}" in nc1_line
    nc3_line = next(line for line in lines if line.startswith("NC3"))
    assert nc3_line.rstrip().endswith("-")  # the transfer layer has no classifier
    with pytest.raises(DataError):
        format_collapse_table({})


def test_plot_collapse_writes_png_with_and_without_history(tmp_path):
    reports = example_reports()
    plain = plot_collapse(reports, tmp_path / "collapse.png")
    history = {"detection": [3.0, 1.0, 0.2, 0.01], "transfer_long_layer_name": [5.0, 4.0, 3.5, 3.4]}
    with_history = plot_collapse(reports, tmp_path / "out" / "collapse_history.png", nc1_history=history)
    for path in (plain, with_history):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200
    assert [p.name for p in tmp_path.rglob(".tmp*")] == []
