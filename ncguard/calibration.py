"""The OOD threshold, calibrated on held-out ID data only (never on OOD data).

Serving flags an input when ``score > threshold``; the threshold is the smallest held-out ID
score that keeps at least the target fraction (TPR) of ID inputs at or below it.
"""

from __future__ import annotations

import numbers

import numpy as np

from ncguard.errors import ConfigError, DataError

DEFAULT_TPR = 0.95  # fraction of in-distribution inputs a threshold keeps, unless told otherwise


def check_scores(values, name: str = "scores") -> np.ndarray:
    """Return `values` as a 1-D float64 array, or raise DataError saying what is wrong with it.

    Shared by the calibration, OOD metric and drift functions so that every one of them rejects
    empty, non-1-D and non-finite input with the same clear message. It lives here, with the
    threshold, because ncguard.ood_metrics builds on calibration (FPR95 uses its threshold),
    never the other way round.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{name} must be numbers, got {type(values).__name__}: {error}") from None
    if array.ndim != 1:
        raise DataError(f"{name} must be a 1-D array of scores, got shape {array.shape}")
    if array.size == 0:
        raise DataError(f"{name} is empty: need at least one score")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise DataError(f"{name} contains {bad} NaN or infinite value(s); every score must be finite")
    return array


def check_open_unit(value, name: str) -> float:
    """`value` as a float, or ConfigError naming `name` unless it is a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name} must be strictly between 0 and 1 (a number), got {value!r}")
    return float(value)


def calibrate_threshold(id_scores, tpr: float = DEFAULT_TPR) -> float:
    """Smallest ID score t with mean(id_scores <= t) >= tpr, so `score > t` flags <= 1 - tpr of ID.

    This is the empirical quantile of type 1 (inverse of the empirical CDF), computed on the
    exact fractions k/n so that e.g. 19 of 20 scores count as 0.95 without rounding surprises.
    """
    tpr = check_open_unit(tpr, "tpr")
    scores = np.sort(check_scores(id_scores, "id_scores"))
    kept_fraction = np.arange(1, scores.size + 1) / scores.size
    index = int(np.searchsorted(kept_fraction, tpr, side="left"))
    return float(scores[min(index, scores.size - 1)])


def split_for_calibration(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (fit_index, calibration_index) over range(n): a seeded random split, each sorted.

    The calibration part holds round(fraction * n) samples, at least one, and the fit part keeps
    at least one; the same (n, fraction, seed) always gives the same split.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ConfigError(f"n must be an integer sample count, got {n!r}")
    if n < 2:
        raise DataError(f"need at least 2 samples to split off a calibration set, got {n}")
    fraction = check_open_unit(fraction, "fraction")
    n_calibration = min(max(int(round(fraction * n)), 1), n - 1)
    permutation = np.random.default_rng(seed).permutation(int(n))
    calibration_index = np.sort(permutation[:n_calibration])
    fit_index = np.sort(permutation[n_calibration:])
    return fit_index, calibration_index


ECE_BINS = 15  # Guo et al. (2017) report ECE with 15 equal-width confidence bins


def expected_calibration_error(probabilities, labels, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_m |B_m| / n * |accuracy(B_m) - mean confidence(B_m)| (Guo et al., ICML 2017).

    Confidence is the largest probability of a row and the prediction its argmax; B_m holds the
    rows whose confidence falls in ((m - 1) / M, m / M] (a confidence of exactly 0 goes to the first
    bin). 0 for a perfectly calibrated classifier; at most 1.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        raise DataError(f"probabilities must be a non-empty [N, C] array, got shape {probabilities.shape}")
    if labels.shape != (probabilities.shape[0],):
        raise DataError(f"labels must be [N={probabilities.shape[0]}], got shape {labels.shape}")
    if not np.all(np.isfinite(probabilities)):
        raise DataError("probabilities contain NaN or infinite values")
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)  # sum of (acc - conf) per bin
    return float(np.abs(gap[counts > 0]).sum() / len(labels))
