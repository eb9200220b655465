"""Gaussian discriminant density (Mukhoti, Kirsch, van Amersfoort, Torr & Gal, "Deep
Deterministic Uncertainty: A New Simple Baseline", CVPR 2023)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from .base import Detector, logsumexp

# Jitter added to a class covariance's diagonal: the first that makes it positive definite
# wins. DDU walks a ladder of powers of ten; 1e-12 is about where float64 round-off in a
# unit-scale covariance ends, and 1 is the most that still leaves the density meaningful.
JITTER_LADDER = (0.0,) + tuple(10.0**exponent for exponent in range(-12, 1))


# Class covariances of a collapsed layer can be (numerically) singular: the detection features of the
# simplex-ETF head span one dimension fewer than their width, so one variance is pure float round-off.
# Whitening such a direction turns the float32 differences between two runtimes into score (export
# parity failed on Fashion-MNIST). Eigenvalues below this fraction of the largest are lifted to it:
# 1e-6 in variance is 1e-3 in spread, far above float32 round-off and far below any real class spread.
EIGENVALUE_FLOOR = 1e-6


def lift_small_eigenvalues(covariance: np.ndarray, relative_floor: float = EIGENVALUE_FLOOR) -> np.ndarray:
    """The covariance with eigenvalues below relative_floor * the largest raised to that level."""
    values, vectors = np.linalg.eigh(covariance)
    floor = relative_floor * max(float(values.max(initial=0.0)), 0.0)
    if floor == 0.0 or values.min() >= floor:
        return covariance
    return (vectors * np.maximum(values, floor)) @ vectors.T


def smallest_jitter_cholesky(covariance: np.ndarray) -> tuple[float, np.ndarray]:
    """(jitter, L) with L L^T = covariance + jitter I, for the smallest jitter on the ladder."""
    identity = np.eye(covariance.shape[0])
    for jitter in JITTER_LADDER:
        try:
            return jitter, np.linalg.cholesky(covariance + jitter * identity)
        except np.linalg.LinAlgError:
            continue
    raise DataError(f"a class covariance stays non-positive-definite even with jitter {JITTER_LADDER[-1]}")


def mixture_log_weights(counts: np.ndarray, width: int, log_det: np.ndarray) -> np.ndarray:
    """log pi_c - (D log 2 pi + log det Sigma_c) / 2: everything in log pi_c N(v; mu_c, Sigma_c) but the
    distance, with the priors pi_c = counts / N."""
    return np.log(counts / counts.sum()) - 0.5 * (width * np.log(2.0 * np.pi) + log_det)


class DDU(Detector):
    """score = -log sum_c pi_c N(v; mu_c, Sigma_c + j_c I).

    pi_c are the class priors (counts / N), Sigma_c the per-class full (maximum-likelihood)
    covariances (eigenvalues below EIGENVALUE_FLOOR of the largest lifted to it) and j_c the smallest
    jitter from `JITTER_LADDER` that makes the Cholesky factorisation succeed, chosen per class (a class with few samples needs more than a
    well-populated one). With L_c the Cholesky factor, log N = -(D log 2 pi + 2 sum log diag L_c
    + ||L_c^-1 (v - mu_c)||^2) / 2, and the mixture is summed with logsumexp, so nothing under-
    or overflows. `whitening_` stores L_c^-1 so scoring is a matrix product per class.
    """

    name = "ddu"
    log_density_scale = 1.0  # score = -log p(v) itself
    uses_features = True
    needs_class_covariances = True

    def _fit(self, stats, weight, bias):
        if not hasattr(stats, "class_covariances_"):
            raise ConfigError("the 'ddu' score needs per-class covariances: fit the statistics with per_class_covariance=True")
        n_classes, width = stats.means_.shape
        self.means_ = stats.means_.copy()
        self.whitening_ = np.empty((n_classes, width, width))
        self.jitters_ = np.empty(n_classes)
        log_det = np.empty(n_classes)
        for c in range(n_classes):
            jitter, cholesky = smallest_jitter_cholesky(lift_small_eigenvalues(stats.class_covariances_[c]))
            self.jitters_[c] = jitter
            self.whitening_[c] = np.linalg.inv(cholesky)
            log_det[c] = 2.0 * np.log(np.diag(cholesky)).sum()
        self.log_weights_ = mixture_log_weights(stats.counts_, width, log_det)

    def _feature_width(self):
        return self.means_.shape[1]

    def _score(self, features, logits):
        log_joint = np.empty((features.shape[0], self.means_.shape[0]))
        for c, (mean, whitening) in enumerate(zip(self.means_, self.whitening_)):
            whitened = (features - mean) @ whitening.T
            log_joint[:, c] = self.log_weights_[c] - 0.5 * (whitened**2).sum(axis=1)
        return -logsumexp(log_joint)

    def _graph(self, b, features, logits):
        # -logsumexp_c(log w_c - ||L_c^-1 (v - mu_c)||^2 / 2) in 7 nodes. Centre first ([1, N, D] - [C, 1, D]
        # broadcasts straight to [C, N, D], no Transpose), then whiten per class with one batched MatMul
        # ([C, N, D] x [C, D, D]). Whitening v and mu_c separately and subtracting the two large results
        # cancels catastrophically in float32 when L_c^-1 has large entries (a collapsed layer). The 1/2 is
        # folded into the whitening (sqrt(1/2) L_c^-1), and ONNX Runtime's ReduceLogSumExp subtracts the row
        # maximum itself, as ncguard.scores.base.logsumexp does.
        diff = b.node("Sub", [b.node("Unsqueeze", [features, b.axes(0)]), b.constant("means", self.means_[:, None, :])], "diff")
        half_whitening_t = np.sqrt(0.5) * np.transpose(self.whitening_, (0, 2, 1))
        whitened = b.node("MatMul", [diff, b.constant("half_whitening_t", half_whitening_t)], "whitened")
        half_distances = b.reduce("ReduceSumSquare", whitened, 2, hint="half_distances")  # [C, N]
        log_joint = b.node("Sub", [b.constant("log_weights", self.log_weights_[:, None]), half_distances], "log_joint")
        return b.neg(b.reduce("ReduceLogSumExp", log_joint, 0, hint="log_density"))
