"""Drift distances: ~0 for the same distribution, clearly > 0 for shifted ones, pinned to direct
computations and SciPy; the rolling window stays bounded and consistent under threads."""


import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from ncguard.drift import (
    class_distribution,
    js_distance,
    ks_distance,
    mean_shift,
    psi,
    reference_quantiles,
)
from ncguard.errors import ConfigError, DataError

# ---------------------------------------------------------------- reference quantiles


def test_reference_quantiles_span_the_sample_in_order():
    values = np.random.default_rng(0).exponential(size=1000)
    quantiles = reference_quantiles(values, n_quantiles=50)
    assert quantiles.shape == (50,)
    assert quantiles[0] == values.min() and quantiles[-1] == values.max()
    assert np.all(np.diff(quantiles) >= 0)
    assert quantiles[25] == pytest.approx(np.median(values), rel=0.05)


@pytest.mark.parametrize("n_quantiles", [9, 0, 2.5, True])
def test_reference_quantiles_needs_at_least_ten(n_quantiles):
    with pytest.raises(ConfigError, match="n_quantiles"):
        reference_quantiles(np.arange(100.0), n_quantiles)


# ---------------------------------------------------------------- PSI


def direct_psi(window, quantiles, eps=1e-4):
    """PSI over bins (-inf, q1], ..., (q_{n-2}, inf), reference mass 1/(n-1) each (distinct quantiles)."""
    edges = np.r_[-np.inf, quantiles[1:-1], np.inf]
    window_mass = np.array([np.mean((window > lo) & (window <= hi)) for lo, hi in zip(edges[:-1], edges[1:])])
    window_mass = np.maximum(window_mass, eps)
    reference_mass = np.full(edges.size - 1, 1.0 / (quantiles.size - 1))
    return np.sum((window_mass - reference_mass) * np.log(window_mass / reference_mass))


def test_psi_hand_case():
    # Bins (-inf, 1], (1, 2], (2, inf) hold 1/3 of the reference each; the window puts 1/2, 1/4, 1/4 there.
    expected = (0.5 - 1 / 3) * np.log(1.5) + 2 * (0.25 - 1 / 3) * np.log(0.75)
    assert psi([0.5, -7.0, 1.5, 2.5], [0.0, 1.0, 2.0, 3.0]) == pytest.approx(expected)


@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0])
def test_psi_matches_direct_computation(shift):
    rng = np.random.default_rng(1)
    quantiles = reference_quantiles(rng.normal(size=5000), 91)  # 90 bins: every 9th edge is a decile
    window = rng.normal(shift, 1.0, size=800)
    assert psi(window, quantiles, n_bins=None) == pytest.approx(direct_psi(window, quantiles), rel=1e-12)
    assert psi(window, quantiles) == pytest.approx(direct_psi(window, quantiles[::9]), rel=1e-12)
    assert psi(window, quantiles, n_bins=30) == pytest.approx(direct_psi(window, quantiles[::3]), rel=1e-12)


def test_default_decile_bins_keep_small_same_distribution_windows_quiet():
    rng = np.random.default_rng(9)
    quantiles = reference_quantiles(rng.normal(size=20_000), 100)
    windows = [rng.normal(size=200) for _ in range(20)]
    # Sampling noise alone: (bins - 1) / window size on average, so ~0.05 with 10 bins and ~0.5+ with 99.
    assert np.mean([psi(w, quantiles) for w in windows]) < 0.1
    assert np.mean([psi(w, quantiles, n_bins=None) for w in windows]) > 0.3
    assert np.mean([psi(rng.normal(0.5, size=200), quantiles) for _ in range(20)]) > 0.25


@pytest.mark.parametrize("n_bins", [1, 0, 2.5, True])
def test_psi_rejects_bad_bin_counts(n_bins):
    with pytest.raises(ConfigError, match="n_bins"):
        psi([0.1, 0.2], np.arange(20.0), n_bins=n_bins)


def test_psi_is_near_zero_for_the_same_distribution_and_large_when_shifted():
    rng = np.random.default_rng(2)
    quantiles = reference_quantiles(rng.gamma(2.0, size=50_000), 20)
    assert psi(rng.gamma(2.0, size=50_000), quantiles) < 0.01
    assert psi(rng.gamma(2.0, size=50_000) + 1.0, quantiles) > 0.25
    assert psi(rng.gamma(2.0, size=50_000) * 1.5, quantiles) > 0.1


def saturating_scores(rng, n, shift=0.0):
    """40% of the scores sit exactly at -1 (like MSP on confident inputs), the rest spread above."""
    scores = rng.uniform(-1.0, 0.0, size=n) + shift
    scores[rng.random(n) < 0.4] = -1.0
    return scores


def test_repeated_reference_quantiles_do_not_fake_drift():
    rng = np.random.default_rng(3)
    quantiles = reference_quantiles(saturating_scores(rng, 40_000), 100)
    assert np.sum(quantiles == -1.0) > 30  # many repeated quantiles: the case being tested
    same = saturating_scores(rng, 40_000)
    assert psi(same, quantiles) < 0.01
    assert ks_distance(same, quantiles) < 0.02
    no_saturation = rng.uniform(-1.0, 0.0, size=40_000)
    assert psi(no_saturation, quantiles) > 0.25
    assert ks_distance(no_saturation, quantiles) == pytest.approx(0.4, abs=0.02)


def test_psi_handles_all_equal_reference_and_checks_input():
    quantiles = np.zeros(10)
    assert psi(np.zeros(50), quantiles) == pytest.approx(0.0)
    assert psi(np.ones(50), quantiles) > 1.0
    assert ks_distance(np.zeros(50), quantiles) == 0.0
    assert ks_distance(np.r_[np.zeros(30), np.ones(20)], quantiles) == pytest.approx(0.4)
    with pytest.raises(DataError, match="sorted"):
        psi([0.1], [3.0, 2.0, 1.0])
    with pytest.raises(DataError, match="window"):
        psi([], np.arange(10.0))
    with pytest.raises(DataError, match="NaN"):
        psi([np.nan], np.arange(10.0))
    with pytest.raises(ConfigError, match="eps"):
        psi([0.1], np.arange(10.0), eps=0)


# ---------------------------------------------------------------- KS


@pytest.mark.parametrize(
    "window, expected",
    [([0.5], 0.5), ([0.25, 0.75], 0.25), ([2.0, 3.0], 1.0), ([-1.0], 1.0), ([0.0, 1.0], 0.5)],
)
def test_ks_hand_cases_against_uniform_reference(window, expected):
    # Quantiles 0 and 1 only: F_ref is the uniform CDF on [0, 1].
    assert ks_distance(window, [0.0, 1.0]) == pytest.approx(expected)


@pytest.mark.parametrize("shift", [0.0, 0.2, 1.0])
def test_ks_matches_a_dense_grid_evaluation(shift):
    rng = np.random.default_rng(4)
    quantiles = reference_quantiles(rng.normal(size=3000), 30)
    window = rng.normal(shift, 1.2, size=300)
    grid = np.unique(np.r_[np.linspace(-6, 7, 20_001), window, np.nextafter(window, -np.inf)])
    window_cdf = np.searchsorted(np.sort(window), grid, side="right") / window.size
    reference_cdf = np.interp(grid, quantiles, np.linspace(0, 1, quantiles.size))
    assert ks_distance(window, quantiles) == pytest.approx(np.max(np.abs(window_cdf - reference_cdf)), abs=1e-9)


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 2.0)])
def test_ks_approximates_the_two_sample_statistic_on_large_samples(shift, scale):
    rng = np.random.default_rng(5)
    reference = rng.normal(size=20_000)
    window = rng.normal(shift, scale, size=5000)
    expected = ks_2samp(reference, window).statistic
    assert ks_distance(window, reference_quantiles(reference, 1000)) == pytest.approx(expected, abs=0.01)


def test_ks_is_small_for_same_distribution_and_large_for_shifted():
    rng = np.random.default_rng(6)
    quantiles = reference_quantiles(rng.normal(size=20_000), 100)
    assert ks_distance(rng.normal(size=20_000), quantiles) < 0.02
    assert ks_distance(rng.normal(0.5, size=20_000), quantiles) > 0.15


# ---------------------------------------------------------------- class distribution and JS


def test_class_distribution_hand_case_and_errors():
    np.testing.assert_allclose(class_distribution([0, 2, 2, 3], 5), [0.25, 0, 0.5, 0.25, 0])
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        class_distribution([0, 3], 3)
    with pytest.raises(DataError, match="integer"):
        class_distribution([0.0, 1.0], 3)
    with pytest.raises(DataError, match="non-empty"):
        class_distribution([], 3)
    with pytest.raises(ConfigError, match="n_classes"):
        class_distribution([0], 0)


@pytest.mark.parametrize("seed", range(5))
def test_js_distance_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    p, q = rng.random(10), rng.random(10)
    p[rng.random(10) < 0.3] = 0.0  # zeros exercise 0 log 0
    q[0] = 0.0
    assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)


def test_js_distance_extremes_and_normalisation():
    assert js_distance([0.2, 0.3, 0.5], [2, 3, 5]) == pytest.approx(0.0, abs=1e-12)
    assert js_distance([1, 0, 0], [0, 0.5, 0.5]) == pytest.approx(1.0)
    labels = np.random.default_rng(7).integers(0, 4, size=5000)
    priors = np.full(4, 0.25)
    assert js_distance(class_distribution(labels, 4), priors) < 0.05
    assert js_distance(class_distribution(np.zeros(100, dtype=int), 4), priors) > 0.5
    with pytest.raises(DataError, match="same number of classes"):
        js_distance([0.5, 0.5], [1 / 3] * 3)
    with pytest.raises(DataError, match="negative"):
        js_distance([-0.5, 1.5], [0.5, 0.5])
    with pytest.raises(DataError, match="sums to zero"):
        js_distance([0, 0], [0.5, 0.5])


# ---------------------------------------------------------------- feature mean shift


def test_mean_shift_hand_case_and_errors():
    assert mean_shift([1.0, 2.0], [0.0, 0.0], [1.0, 4.0]) == pytest.approx(0.75)  # (1/1 + 2/4) / 2
    assert mean_shift([3.0, -1.0], [3.0, -1.0], [0.5, 0.0]) == 0.0  # zero std is fine when nothing moved
    rng = np.random.default_rng(8)
    features = rng.normal(5.0, 2.0, size=(4000, 16))
    ref_mean, ref_std = features.mean(axis=0), features.std(axis=0)
    assert mean_shift(rng.normal(5.0, 2.0, size=(4000, 16)).mean(axis=0), ref_mean, ref_std) < 0.05
    assert mean_shift(rng.normal(6.0, 2.0, size=(4000, 16)).mean(axis=0), ref_mean, ref_std) > 0.4
    with pytest.raises(DataError, match="same length"):
        mean_shift([1.0], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(DataError, match="negative"):
        mean_shift([1.0], [0.0], [-1.0])
