"""Drift distances: ~0 for the same distribution, clearly > 0 for shifted ones, pinned to direct
computations and SciPy; the rolling window stays bounded and consistent under threads."""

import sys
import threading

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from ncguard.drift import (
    RollingWindow,
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


# ---------------------------------------------------------------- rolling window


def test_rolling_window_keeps_the_most_recent_values_in_order():
    window = RollingWindow(5)
    assert len(window) == 0 and window.values().shape == (0,)
    window.extend([1, 2, 3])
    window.extend(4.5)
    window.extend(np.arange(10, 13))
    assert len(window) == 5
    np.testing.assert_array_equal(window.values(), [3, 4.5, 10, 11, 12])
    window.clear()
    assert len(window) == 0


def test_rolling_window_holds_rows_of_equal_shape():
    window = RollingWindow(3)
    rows = np.arange(8.0).reshape(4, 2)
    window.extend(rows)
    np.testing.assert_array_equal(window.values(), rows[1:])
    rows[3, 0] = -1.0  # later edits by the caller do not reach the stored rows
    assert window.values()[2, 0] == 6.0
    with pytest.raises(DataError, match="shape"):
        window.extend(np.zeros((1, 3)))


@pytest.mark.parametrize("size", [0, -1, 2.5, None])
def test_rolling_window_size_must_be_a_positive_integer(size):
    with pytest.raises(ConfigError, match="size"):
        RollingWindow(size)


def run_threads(writer, n_writers, reader=None, n_readers=2):
    """Start readers and writers together with frequent thread switches; return errors raised in them."""
    errors, stop = [], threading.Event()

    def guarded(target, *args):
        try:
            target(*args)
        except Exception as error:  # noqa: BLE001 - any failure inside a thread must fail the test
            errors.append(error)

    def read_until_stopped():
        while not stop.is_set():
            reader()

    writers = [threading.Thread(target=guarded, args=(writer, k)) for k in range(n_writers)]
    readers = [threading.Thread(target=guarded, args=(read_until_stopped,)) for _ in range(n_readers if reader else 0)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads very often so that races show up
    try:
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join()
        stop.set()
        for thread in readers:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    return errors


def test_rolling_window_stays_bounded_while_threads_write_and_read():
    size, batch = 100, 7
    window, lengths = RollingWindow(size), []

    def write(k):
        for i in range(300):
            window.extend(np.full(batch, k * 1000 + i))

    def read():
        values = window.values()
        lengths.append(values.size)
        assert values.size == len(values) <= size

    assert run_threads(write, 4, read) == []
    assert lengths and max(lengths) <= size
    assert len(window) == size and window.values().shape == (size,)


def test_rolling_window_extend_is_atomic_under_threads():
    n_writers, batches, batch = 4, 2000, 7
    window = RollingWindow(n_writers * batches * batch)  # big enough to keep everything

    def write(k):
        for i in range(batches):
            start = (k * batches + i) * batch
            window.extend(np.arange(start, start + batch))  # one batch of consecutive numbers

    def read():
        values = window.values()
        # Only whole batches may ever be visible, each one unbroken by other writers' values.
        assert values.size % batch == 0
        assert np.all(np.diff(values.reshape(-1, batch), axis=1) == 1)

    assert run_threads(write, n_writers, read) == []
    values = window.values()
    np.testing.assert_array_equal(np.sort(values), np.arange(n_writers * batches * batch))
    assert np.all(np.diff(values.reshape(-1, batch), axis=1) == 1)
