"""Distances behind the Prometheus drift gauges: served traffic against the training reference.

The reference travels inside the model file, so it is small: quantiles of the ID OOD-score
distribution, class priors and the transfer-feature mean and standard deviation. Each function
returns a distance (0 = no drift), never a yes/no, so alerts can pick their own thresholds.

Written in NumPy: the serving image must not need SciPy; the tests pin these to scipy.stats.ks_2samp
and scipy.spatial.distance.jensenshannon.
"""

from __future__ import annotations

import numbers

import numpy as np

from ncguard.errors import ConfigError, DataError
from ncguard.calibration import check_scores


def reference_quantiles(values, n_quantiles: int = 100) -> np.ndarray:
    """`n_quantiles` quantiles of `values` at probabilities linspace(0, 1, n_quantiles).

    Minimum and maximum included, so consecutive quantiles bound n_quantiles - 1 bins of equal
    reference mass (as in sklearn's QuantileTransformer). At least 10 keep PSI and KS meaningful.
    """
    if isinstance(n_quantiles, bool) or not isinstance(n_quantiles, numbers.Integral) or n_quantiles < 10:
        raise ConfigError(f"n_quantiles must be an integer of at least 10, got {n_quantiles!r}")
    values = check_scores(values, "reference values")
    return np.quantile(values, np.linspace(0.0, 1.0, int(n_quantiles)))


class _ReferenceCDF:
    """F_ref: piecewise linear through (q_k, k/(n-1)); repeated quantiles make it jump.

    Repeated quantiles are common (e.g. MSP scores saturate at -1), so each distinct knot keeps
    the lowest level (left limit) and the highest level (value, F being right-continuous).
    """

    def __init__(self, ref_quantiles):
        quantiles = check_scores(ref_quantiles, "ref_quantiles")
        if quantiles.size < 2:
            raise DataError(f"ref_quantiles needs at least 2 values, got {quantiles.size}")
        if np.any(np.diff(quantiles) < 0):
            raise DataError("ref_quantiles must be sorted in increasing order (as reference_quantiles returns them)")
        levels = np.linspace(0.0, 1.0, quantiles.size)
        self.quantiles = quantiles
        self.knots, first = np.unique(quantiles, return_index=True)
        last = np.append(first[1:] - 1, quantiles.size - 1)
        self.level_left, self.level_right = levels[first], levels[last]

    def left_limit(self, x: np.ndarray) -> np.ndarray:
        """F_ref(x-) = P(reference < x)."""
        x = np.asarray(x, dtype=np.float64)
        segment = np.searchsorted(self.knots, x, side="left") - 1  # last knot strictly below x
        result = np.where(segment < 0, 0.0, 1.0)
        inside = (segment >= 0) & (segment < self.knots.size - 1)
        start, at = segment[inside], x[inside]
        x0, x1 = self.knots[start], self.knots[start + 1]
        y0, y1 = self.level_right[start], self.level_left[start + 1]
        result[inside] = y0 + (y1 - y0) * (at - x0) / (x1 - x0)
        return result

    def value(self, x: np.ndarray) -> np.ndarray:
        """F_ref(x) = P(reference <= x)."""
        x = np.asarray(x, dtype=np.float64)
        position = np.clip(np.searchsorted(self.knots, x, side="left"), 0, self.knots.size - 1)
        on_knot = self.knots[position] == x
        return np.where(on_knot, self.level_right[position], self.left_limit(x))


def psi(window, ref_quantiles, eps: float = 1e-4, n_bins: int | None = 10) -> float:
    """Population stability index sum_b (w_b - r_b) ln(w_b / r_b) over equal-reference-mass bins.

    The reference quantiles cut the line into bins (-inf, c_1], (c_1, c_2], ..., (c_k, inf) of
    equal reference mass: by default `n_bins` = 10 (the usual decile PSI), with cuts read off the
    reference quantile function; `n_bins=None` uses every inner quantile as a cut. Few bins on
    purpose: with 99 bins a same-distribution window of 200 scores leaves many bins empty and
    scores PSI ~ 1 from sampling noise alone (about 0.05 with 10 bins). Repeated quantiles merge
    bins and add up their mass. Window values beyond the reference range fall in the end bins;
    empty bins are floored at `eps` so the log stays finite. Rule of thumb: < 0.1 stable, > 0.25 shifted.
    """
    reference = _ReferenceCDF(ref_quantiles)
    window = check_scores(window, "window")
    if not eps > 0:
        raise ConfigError(f"eps must be positive, got {eps!r}")
    if n_bins is not None and (isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 2):
        raise ConfigError(f"n_bins must be an integer of at least 2, or None for every reference bin; got {n_bins!r}")
    quantiles = reference.quantiles
    if n_bins is None or n_bins >= quantiles.size - 1:
        cuts = quantiles[1:-1]
    else:  # inverse of the piecewise-linear reference CDF at the bin edges
        cuts = np.interp(np.linspace(0.0, 1.0, int(n_bins) + 1)[1:-1], np.linspace(0.0, 1.0, quantiles.size), quantiles)
    cuts = np.unique(cuts)
    reference_mass = np.diff(np.concatenate([[0.0], reference.value(cuts), [1.0]]))
    window_mass = np.bincount(np.searchsorted(cuts, window, side="left"), minlength=cuts.size + 1) / window.size
    reference_mass, window_mass = np.maximum(reference_mass, eps), np.maximum(window_mass, eps)
    return float(np.sum((window_mass - reference_mass) * np.log(window_mass / reference_mass)))


def ks_distance(window, ref_quantiles) -> float:
    """Kolmogorov-Smirnov distance sup_x |F_window(x) - F_ref(x)|.

    F_window is the window's empirical CDF, F_ref is piecewise linear through the quantiles.
    Between window values F_window is flat and F_ref monotone, so the supremum is reached at a
    window value, from the left or the right: those are the only points evaluated.
    """
    reference = _ReferenceCDF(ref_quantiles)
    window_sorted = np.sort(check_scores(window, "window"))
    values = np.unique(window_sorted)
    below = np.searchsorted(window_sorted, values, side="left") / window_sorted.size
    at_or_below = np.searchsorted(window_sorted, values, side="right") / window_sorted.size
    gap_left = np.abs(below - reference.left_limit(values))
    gap_right = np.abs(at_or_below - reference.value(values))
    return float(max(gap_left.max(), gap_right.max()))


def class_distribution(labels, n_classes: int) -> np.ndarray:
    """Fraction of `labels` (class indices) falling in each of `n_classes` classes."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 1:
        raise ConfigError(f"n_classes must be a positive integer, got {n_classes!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"labels must be a non-empty 1-D array of class indices, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"labels must lie in [0, {n_classes}), got values from {labels.min()} to {labels.max()}")
    return np.bincount(labels, minlength=n_classes) / labels.size


def _as_distribution(values, name: str) -> np.ndarray:
    array = check_scores(values, name)
    if np.any(array < 0):
        raise DataError(f"{name} has negative entries; a distribution needs non-negative weights")
    total = array.sum()
    if total == 0:
        raise DataError(f"{name} sums to zero; it is not a distribution")
    return array / total


def js_distance(p, q) -> float:
    """Jensen-Shannon distance sqrt(JSD(p, q)), base 2, in [0, 1]; inputs are normalized first."""
    p, q = _as_distribution(p, "p"), _as_distribution(q, "q")
    if p.shape != q.shape:
        raise DataError(f"p and q must have the same number of classes, got {p.size} and {q.size}")
    middle = (p + q) / 2.0

    def kl_to_middle(a):
        support = a > 0  # 0 log 0 = 0; middle > 0 wherever a > 0
        return np.sum(a[support] * np.log2(a[support] / middle[support]))

    divergence = (kl_to_middle(p) + kl_to_middle(q)) / 2.0
    return float(np.sqrt(np.clip(divergence, 0.0, 1.0)))


def mean_shift(window_features_mean, ref_mean, ref_std, eps: float = 1e-8) -> float:
    """Mean over feature dimensions of |window mean - reference mean| / reference std."""
    window_mean = check_scores(window_features_mean, "window_features_mean")
    ref_mean, ref_std = check_scores(ref_mean, "ref_mean"), check_scores(ref_std, "ref_std")
    if not window_mean.shape == ref_mean.shape == ref_std.shape:
        raise DataError(
            f"window mean, reference mean and reference std must have the same length, got "
            f"{window_mean.size}, {ref_mean.size} and {ref_std.size}"
        )
    if np.any(ref_std < 0):
        raise DataError("ref_std has negative entries; standard deviations are non-negative")
    return float(np.mean(np.abs(window_mean - ref_mean) / (ref_std + eps)))


# Alert thresholds of the drift distances, shared by the service's alert rules and dashboards
# (serving.dashboards.generate, which says how they were measured) and `ncguard audit`'s report.
OOD_RATE_MARGIN = 0.10  # above 1 - TPR, the rate the threshold lets through on ID data
PSI_LIMIT = 0.25  # the usual rule of thumb: > 0.25 means the distribution has moved
KS_LIMIT = 0.20
JS_LIMIT = 0.20
FEATURE_SHIFT_LIMIT = 0.25  # in reference standard deviations, averaged over features
DRIFT_LIMITS = {"score_psi": PSI_LIMIT, "score_ks": KS_LIMIT, "class_js": JS_LIMIT, "feature_mean_shift": FEATURE_SHIFT_LIMIT}


# Histogram buckets, read off the reference score quantiles: dense where in-distribution scores
# fall, so the histogram shows a shift within the ID range, plus the threshold and a ladder above
# the largest ID score (multiples of the ID score range), where OOD inputs land.
BUCKET_PROBABILITIES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
BEYOND_REFERENCE = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
BUCKET_DIGITS = 6  # significant digits of a bucket bound: readable `le` labels, distinct bounds


def score_buckets(score_quantiles, threshold: float) -> tuple[float, ...]:
    """Upper bounds of the ncguard_ood_score histogram buckets (sorted, distinct; +Inf is implied).

    `score_quantiles` are the model's reference quantiles at probabilities linspace(0, 1, n)
    (ncguard.drift.reference_quantiles); the nearest stored quantile stands for each probability.
    """
    quantiles = np.asarray(score_quantiles, dtype=np.float64)
    if quantiles.ndim != 1 or quantiles.size < 2 or not np.isfinite(quantiles).all():
        raise DataError(f"score_quantiles must be at least 2 finite values, got {quantiles.size}")
    if not np.isfinite(threshold):
        raise DataError(f"the threshold must be a finite number, got {threshold!r}")
    positions = np.rint(np.asarray(BUCKET_PROBABILITIES) * (quantiles.size - 1)).astype(int)
    lowest, highest = quantiles[0], quantiles[-1]
    spread = highest - lowest
    if spread <= 0:  # a constant reference: give the ladder a scale of its own
        spread = max(abs(highest), 1.0)
    bounds = np.concatenate([quantiles[positions], [threshold], highest + spread * np.asarray(BEYOND_REFERENCE)])
    rounded = {float(f"{bound:.{BUCKET_DIGITS}g}") for bound in bounds}
    return tuple(sorted(rounded))
