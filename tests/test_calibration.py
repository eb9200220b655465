"""Threshold calibration on held-out ID scores and the fit/calibration split."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncguard.calibration import calibrate_threshold, split_for_calibration
from ncguard.errors import ConfigError, DataError


@pytest.mark.parametrize(
    "scores, tpr, expected",
    [
        (np.arange(1.0, 21.0), 0.95, 19.0),  # 19 of 20 kept is exactly 95%
        (np.arange(1.0, 11.0), 0.7, 7.0),  # 0.7 * 10 is 7.000000000000001 in floats: still 7 kept
        (np.arange(1.0, 11.0), 0.71, 8.0),
        ([5.0, 1.0, 1.0, 1.0, 2.0], 0.5, 1.0),  # ties: keeping 3 of 5 at score 1 already reaches 50%
        ([3.0], 0.95, 3.0),
        ([4.0, -2.0], 0.2, -2.0),
    ],
)
def test_hand_cases(scores, tpr, expected):
    assert calibrate_threshold(scores, tpr) == expected


@settings(max_examples=80, deadline=None)
@given(
    scores=st.lists(st.integers(-5, 5) | st.floats(-1e3, 1e3), min_size=1, max_size=60),
    tpr=st.floats(0.001, 0.999),
)
def test_threshold_is_the_smallest_score_keeping_tpr(scores, tpr):
    scores = np.asarray(scores, dtype=float)
    threshold = calibrate_threshold(scores, tpr)
    assert threshold in scores
    assert np.mean(scores <= threshold) >= tpr
    assert np.mean(scores < threshold) < tpr  # any smaller threshold would keep too few


@pytest.mark.parametrize("tpr", [0.8, 0.95, 0.99])
def test_kept_fraction_on_fresh_samples_is_close_to_tpr(tpr):
    rng = np.random.default_rng(11)
    threshold = calibrate_threshold(rng.gamma(2.0, size=20_000), tpr)
    fresh = rng.gamma(2.0, size=20_000)
    assert np.mean(fresh <= threshold) == pytest.approx(tpr, abs=0.01)


@pytest.mark.parametrize("tpr", [0, 1, 1.0, -0.5, 2, "0.9", None, True])
def test_tpr_outside_open_unit_interval_is_a_config_error(tpr):
    with pytest.raises(ConfigError, match="tpr"):
        calibrate_threshold([0.1, 0.2, 0.3], tpr)


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [0.1, np.nan]])
def test_bad_scores_are_a_data_error(bad):
    with pytest.raises(DataError, match="id_scores"):
        calibrate_threshold(bad)


@pytest.mark.parametrize("n, fraction", [(1000, 0.1), (2, 0.5), (7, 0.01), (7, 0.99), (31, 0.25)])
def test_split_is_a_disjoint_cover_with_the_requested_size(n, fraction):
    fit_index, calibration_index = split_for_calibration(n, fraction, seed=3)
    assert np.intersect1d(fit_index, calibration_index).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[fit_index, calibration_index]), np.arange(n))
    assert calibration_index.size == min(max(round(fraction * n), 1), n - 1)
    assert fit_index.size >= 1
    assert np.all(np.diff(fit_index) > 0) and np.all(np.diff(calibration_index) > 0)


def test_split_is_deterministic_per_seed():
    first = split_for_calibration(500, 0.2, seed=5)
    again = split_for_calibration(500, 0.2, seed=5)
    other = split_for_calibration(500, 0.2, seed=6)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])


def test_split_is_not_just_the_tail():
    _, calibration_index = split_for_calibration(1000, 0.1, seed=0)
    assert calibration_index.min() < 500 < calibration_index.max()


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_rejects_fraction_outside_unit_interval(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        split_for_calibration(100, fraction)


def test_split_rejects_too_few_samples_and_non_integer_n():
    with pytest.raises(DataError, match="at least 2"):
        split_for_calibration(1)
    with pytest.raises(ConfigError, match="integer"):
        split_for_calibration(10.5)
