"""Neural-collapse metrics NC1-NC4 (Papyan, Han & Donoho 2020), from class moments.

Everything works from class means, the global mean and the within-class covariance, so that the
streaming class statistics (``ncguard.stats.ClassStatistics``) feed it without keeping features
in memory. NC4 needs the features themselves and is accumulated chunk by chunk by
`NearestMeanAgreement`. Formulas: DESIGN.md section 1. Smaller is more collapsed for all of them.
"""

from __future__ import annotations

import numpy as np

from ncguard.errors import DataError

# (report key, short label) in display order; shared by the table and the plots.
COLLAPSE_METRICS = (
    ("nc1", "NC1 tr(Sw Sb+)/C"),
    ("equinorm_means", "NC2 equinorm means"),
    ("equinorm_weights", "NC2 equinorm weights"),
    ("equiangular_means_std", "NC2 cos std means"),
    ("equiangular_means_max_dev", "NC2 |cos+1/(C-1)| means"),
    ("equiangular_weights_std", "NC2 cos std weights"),
    ("equiangular_weights_max_dev", "NC2 |cos+1/(C-1)| weights"),
    ("nc3", "NC3 self-duality"),
    ("nc4", "NC4 NCC mismatch"),
)


def _finite_array(values, name: str, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{name} must be numeric: {error}") from None
    if array.ndim != ndim:
        raise DataError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise DataError(f"{name} contains NaN or infinite values")
    return array


def _centered_means(means, global_mean) -> np.ndarray:
    """Rows mu_c - mu_G, shape [C, D], after checking shapes."""
    means = _finite_array(means, "means", 2)
    global_mean = _finite_array(global_mean, "global_mean", 1)
    if means.shape[0] < 2:
        raise DataError(f"collapse metrics need at least 2 classes, got {means.shape[0]}")
    if global_mean.shape[0] != means.shape[1]:
        raise DataError(
            f"global_mean has {global_mean.shape[0]} dimensions but the class means have {means.shape[1]}"
        )
    return means - global_mean


def _check_weight(weight, n_classes: int, dim: int) -> np.ndarray:
    weight = _finite_array(weight, "weight", 2)
    if weight.shape != (n_classes, dim):
        raise DataError(
            f"classifier weight must have shape [classes, dim] = [{n_classes}, {dim}] "
            f"(one row per class, as torch.nn.Linear stores it), got {list(weight.shape)}"
        )
    return weight


def nc1(within_cov, means, global_mean) -> float:
    """NC1 = tr(Sigma_W Sigma_B^+) / C, with Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T.

    Within-class variability measured in units of the between-class spread; 0 when every
    sample sits on its class mean.
    """
    centered = _centered_means(means, global_mean)
    n_classes, dim = centered.shape
    within_cov = _finite_array(within_cov, "within_cov", 2)
    if within_cov.shape != (dim, dim):
        raise DataError(f"within_cov must have shape [{dim}, {dim}] to match the means, got {list(within_cov.shape)}")
    # Pseudo-inverse through the thin SVD of M = centered^T ([D, C]) instead of np.linalg.pinv of
    # the D x D Sigma_B: cheaper for wide layers and the rank cut acts on singular values of M,
    # not on their squares. With M = U S V^T, Sigma_B^+ = C U S^-2 U^T, so
    # tr(Sigma_W Sigma_B^+) / C = sum_k u_k^T Sigma_W u_k / s_k^2 over the non-negligible s_k.
    left, singular, _ = np.linalg.svd(centered.T, full_matrices=False)
    if singular[0] == 0.0:
        raise DataError("all class means coincide: there is no between-class spread, NC1 is undefined")
    keep = singular > singular[0] * max(dim, n_classes) * np.finfo(np.float64).eps
    directions, singular = left[:, keep], singular[keep]
    within_along = np.einsum("dk,de,ek->k", directions, within_cov, directions)
    return float(np.sum(within_along / singular**2))


def _norm_spread(vectors: np.ndarray, name: str) -> float:
    """std / mean of the row norms: 0 when all rows have the same length (equinorm)."""
    norms = np.linalg.norm(vectors, axis=1)
    if norms.mean() == 0.0:
        raise DataError(f"all {name} are zero vectors; equinorm is undefined")
    return float(norms.std() / norms.mean())


def _pairwise_cosines(vectors: np.ndarray, name: str) -> np.ndarray:
    """Cosines between every pair of distinct rows (upper triangle)."""
    norms = np.linalg.norm(vectors, axis=1)
    if np.any(norms == 0.0):
        raise DataError(f"some {name} are zero vectors; their angles are undefined")
    unit = vectors / norms[:, None]
    rows, cols = np.triu_indices(vectors.shape[0], k=1)
    return (unit @ unit.T)[rows, cols]


def _angle_terms(vectors: np.ndarray, name: str) -> tuple[float, float]:
    """(std of the pairwise cosines, mean |cos + 1/(C-1)|): both 0 for a simplex ETF."""
    cosines = _pairwise_cosines(vectors, name)
    simplex_cosine = -1.0 / (vectors.shape[0] - 1)
    return float(cosines.std()), float(np.mean(np.abs(cosines - simplex_cosine)))


def nc2(means, global_mean, weight=None) -> dict:
    """NC2 terms: equinorm (std/mean of norms) and equiangularity of centered means and weights.

    Keys: equinorm_means, equinorm_weights, equiangular_means_std, equiangular_means_max_dev,
    equiangular_weights_std, equiangular_weights_max_dev. The ``*_max_dev`` terms are the mean
    of |cos + 1/(C-1)| over class pairs (distance to the maximal-angle simplex), as in Papyan et
    al. Weight rows w_c are used as they are (not centered). Weight terms are None without a weight.
    """
    centered = _centered_means(means, global_mean)
    means_std, means_dev = _angle_terms(centered, "centered class means")
    report = {
        "equinorm_means": _norm_spread(centered, "centered class means"),
        "equinorm_weights": None,
        "equiangular_means_std": means_std,
        "equiangular_means_max_dev": means_dev,
        "equiangular_weights_std": None,
        "equiangular_weights_max_dev": None,
    }
    if weight is not None:
        weight = _check_weight(weight, *centered.shape)
        weights_std, weights_dev = _angle_terms(weight, "classifier weight rows")
        report["equinorm_weights"] = _norm_spread(weight, "classifier weight rows")
        report["equiangular_weights_std"] = weights_std
        report["equiangular_weights_max_dev"] = weights_dev
    return report


def nc3(means, global_mean, weight) -> float:
    """NC3 (self-duality) = || W/||W||_F - M^T/||M||_F ||_F^2, M = [mu_c - mu_G] as columns.

    0 when the classifier rows point along the centered class means; at most 4.
    """
    centered = _centered_means(means, global_mean)  # this is M^T, shape [C, D]
    weight = _check_weight(weight, *centered.shape)
    weight_norm, means_norm = np.linalg.norm(weight), np.linalg.norm(centered)
    if weight_norm == 0.0:
        raise DataError("classifier weight is all zeros; NC3 is undefined")
    if means_norm == 0.0:
        raise DataError("all class means coincide; NC3 is undefined")
    return float(np.sum((weight / weight_norm - centered / means_norm) ** 2))


class NearestMeanAgreement:
    """NC4, streamed: how often the classifier disagrees with the nearest-class-mean rule.

    Feed chunks with `partial_fit(features, classifier_predictions)`, then `finalize()`;
    `mismatch_` is the fraction of samples whose prediction differs from argmin_c ||h - mu_c||.
    """

    def __init__(self, means):
        self.means = means

    def partial_fit(self, features, classifier_predictions) -> "NearestMeanAgreement":
        """Count disagreements in one chunk (features [N, D], predicted class indices [N])."""
        means = _finite_array(self.means, "means", 2)
        features = _finite_array(features, "features", 2)
        if features.shape[1] != means.shape[1]:
            raise DataError(f"features have {features.shape[1]} dimensions but the class means have {means.shape[1]}")
        predictions = np.asarray(classifier_predictions)
        if predictions.ndim != 1 or predictions.shape[0] != features.shape[0]:
            raise DataError(
                f"classifier_predictions must be 1-D with one class index per feature row "
                f"({features.shape[0]}), got shape {predictions.shape}"
            )
        if predictions.size and not np.issubdtype(predictions.dtype, np.integer):
            raise DataError(f"classifier_predictions must be integer class indices, got dtype {predictions.dtype}")
        if predictions.size and (predictions.min() < 0 or predictions.max() >= means.shape[0]):
            raise DataError(f"classifier_predictions must lie in [0, {means.shape[0]}), got values outside it")
        # Squared distances up to the per-row constant ||h||^2, which does not change the argmin.
        distances = -2.0 * features @ means.T + np.sum(means**2, axis=1)
        nearest = np.argmin(distances, axis=1)
        self.n_samples_seen_ = getattr(self, "n_samples_seen_", 0) + int(features.shape[0])
        self.n_mismatches_ = getattr(self, "n_mismatches_", 0) + int(np.count_nonzero(nearest != predictions))
        return self

    def finalize(self) -> "NearestMeanAgreement":
        """Turn the counts into `mismatch_`; more chunks may follow, call finalize again after."""
        if getattr(self, "n_samples_seen_", 0) == 0:
            raise DataError("NearestMeanAgreement has seen no samples: call partial_fit with data first")
        self.mismatch_ = self.n_mismatches_ / self.n_samples_seen_
        return self


def collapse_report(stats, weight=None, nc4=None) -> dict:
    """All NC metrics of one layer, as plain Python numbers (JSON-ready).

    `stats` is any object with `means_` [C, D], `global_mean_` [D], `covariance_` [D, D] (tied
    within-class covariance) and `counts_` [C]; `weight` the classifier acting on this layer
    ([C, D], or None: NC2 weight terms and NC3 become None); `nc4` a fitted
    NearestMeanAgreement or None (then "nc4" is None).
    """
    missing = [name for name in ("means_", "global_mean_", "covariance_", "counts_") if not hasattr(stats, name)]
    if missing:
        raise DataError(f"class statistics lack {', '.join(missing)}: fit them before asking for NC metrics")
    counts = np.asarray(stats.counts_)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"classes {empty.tolist()} have no samples; NC metrics need every class to be seen")
    report = {"nc1": nc1(stats.covariance_, stats.means_, stats.global_mean_)}
    report.update(nc2(stats.means_, stats.global_mean_, weight))
    report["nc3"] = None if weight is None else nc3(stats.means_, stats.global_mean_, weight)
    if nc4 is None:
        report["nc4"] = None
    else:
        if not hasattr(nc4, "mismatch_"):
            nc4.finalize()
        report["nc4"] = float(nc4.mismatch_)
    means = np.asarray(stats.means_)
    report.update({"n_classes": int(means.shape[0]), "dim": int(means.shape[1]), "n_samples": int(counts.sum())})
    return report


def _format_value(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_collapse_table(reports: dict[str, dict]) -> str:
    """Aligned text table: one row per metric, one column per layer ("-" where not available)."""
    if not reports:
        raise DataError("no collapse reports to format")
    layers = list(reports)
    header = ["metric", *layers]
    rows = [[label, *(_format_value(reports[layer].get(key)) for layer in layers)] for key, label in COLLAPSE_METRICS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
