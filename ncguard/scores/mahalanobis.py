"""Mahalanobis distance to the nearest class mean (Lee, Lee, Lee & Shin, "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Detector
from .ddu import EIGENVALUE_FLOOR

DEFAULT_EIGENVALUE_FLOOR = EIGENVALUE_FLOOR  # decided in the class docstring


def floored_precision(covariance: np.ndarray, relative_floor: float) -> np.ndarray:
    """The inverse of `covariance` with its eigenvalues raised to at least relative_floor * the largest.

    A zero covariance (no spread at all) gives a zero precision: every distance is then 0, as with
    the pseudo-inverse.
    """
    values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
    top = max(float(values.max(initial=0.0)), 0.0)
    if top == 0.0:
        return np.zeros_like(covariance)
    return (vectors / np.maximum(values, relative_floor * top)) @ vectors.T


class Mahalanobis(Detector):
    """score = min_c (v - mu_c)^T Sigma_f^-1 (v - mu_c), Sigma the tied within-class covariance.

    Sigma_f is Sigma with its eigenvalues below `eigenvalue_floor` (default 1e-6, DDU's
    `EIGENVALUE_FLOOR`) times the largest raised to that level, as DDU does per class; 0 exactly at
    a class mean. `eigenvalue_floor=0` gives the former behaviour, the statistics' pseudo-inverse
    (`ClassStatistics.precision_`), which ignores every direction without within-class variance.

    Why the floor (issue 15): with the pseudo-inverse a direction the ID data never varies in (a
    pixel never lit in training, a channel that is constant on every training input) contributes
    nothing, so an input that differs from ID data *only* there scores exactly like its ID twin. With
    the floor, such a direction counts with variance 1e-6 x the largest (a spread of 1e-3 of the
    largest spread: far above float32 round-off, so ONNX Runtime and torch still agree, and far
    below any real class spread, so real directions keep their weight). It also bounds the
    whitening at 1e3 / sqrt(largest variance), where the pseudo-inverse kept directions down to
    width x eps of the largest (whitening up to ~1e7 / sqrt(largest)), so a nearly flat direction
    no longer amplifies float32 round-off into score. Measured:
    - synthetic (tests/test_score_numerics.py): Mahalanobis on the raw 8x8 digits pixels, some of
      which are never lit in the training digits: lighting one of them in the test digits left the
      pseudo-inverse score unchanged (AUROC 0.500 against the unchanged digits); with the floor every
      such input scores above every ID input (AUROC 1.000);
    - the digits test model (`ncguard train --data digits --epochs 15`, ETF head, and the same with
      `--head plain`): AUROC and FPR95 of ID digits:test against noise:uniform, noise:gaussian,
      inverted:digits:test and fashion-mnist:test are the same to 4 decimals with and without the
      floor on every layer (block1, block2, block3, transfer, detection) and for the default fused
      score (ETF head: mean AUROC over the four sets 0.9986 / 0.9806 / 0.9920 / 0.9845 / 0.9698 in
      that layer order, fused 0.9951; plain
      head: fused 0.9972 both ways, Fashion-MNIST 0.9887 vs 0.9888). Their tied covariances have at
      most one eigenvalue below the floor (block3: a channel dead for every input), so real data
      loses nothing, and an input that lights a dead direction is no longer invisible.
    So the floor is the default; the fused score's Mahalanobis components inherit it.
    """

    name = "mahalanobis"
    log_density_scale = 0.5  # score = -2 log N(v; mu_c, Sigma_f) of the nearest class up to a constant
    uses_features = True

    def __init__(self, eigenvalue_floor: float = DEFAULT_EIGENVALUE_FLOOR, layer: str | None = None) -> None:
        self.eigenvalue_floor = eigenvalue_floor
        self.layer = layer

    def _checked_floor(self) -> float:
        floor = self.eigenvalue_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float, np.floating)) or not 0.0 <= floor < 1.0:
            raise ConfigError(f"{self.name} eigenvalue_floor must be a number in [0, 1), got {floor!r}")
        return float(floor)

    def _fit(self, stats, weight, bias):
        floor = self._checked_floor()
        self.means_ = stats.means_.copy()
        self.precision_ = stats.precision_.copy() if floor == 0.0 else floored_precision(stats.covariance_, float(floor))

    def _feature_width(self):
        return self.means_.shape[1]

    def _score(self, features, logits):
        best = np.full(features.shape[0], np.inf)
        for mean in self.means_:  # one class at a time keeps memory at [N, D]
            diff = features - mean
            best = np.minimum(best, ((diff @ self.precision_) * diff).sum(axis=1))
        return np.maximum(best, 0.0)  # the precision is PSD; clip round-off below zero

    def _graph(self, b, features, logits):
        return self._affine_graph(b, features, logits, 1.0, 0.0, False)

    def _affine_graph(self, b, features, logits, scale, offset, column):
        """scale * min_c (v - mu_c)^T P (v - mu_c) - offset in five nodes, nothing of size [N, C, D] formed.

        With scale P = F F^T (P is PSD; a positive scale, a combination's 1 / sigma, is folded into F),
        y = (v - m) F centred on the mean m of the class means (one Gemm, m F its bias) and
        a_c = (mu_c - m) F:
            min_c ||y - a_c||^2 = ||y||^2 + min_c (||a_c||^2 - 2 y . a_c),
        the bracket one Gemm for all classes with the offset in its bias. Centring keeps the expanded
        squares at the size of the data's spread, not of its offset, so float32 cancellation stays
        far below the score's own spread (parity tests). The reference clips round-off below zero; here
        it is left, a few float32 ulps of the largest squares.
        """
        if not scale > 0:
            return super()._affine_graph(b, features, logits, scale, offset, column)
        values, vectors = np.linalg.eigh(self.precision_ * scale)
        keep = values > values.max(initial=0.0) * values.size * np.finfo(np.float64).eps
        factor = vectors[:, keep] * np.sqrt(values[keep])
        if factor.shape[1] == 0:  # a zero precision: every distance is 0, as in the reference
            factor = np.zeros((values.size, 1))
        centre = self.means_.mean(axis=0)
        whitened_means = (self.means_ - centre) @ factor  # [C, r]
        y = b.node("Gemm", [features, b.constant("precision_factor", factor), b.constant("whitened_centre", -(centre @ factor))], "whitened")
        cross = b.node("Gemm", [y, b.constant("whitened_means_t", -2.0 * whitened_means.T),
                                b.constant("whitened_means_sq", (whitened_means**2).sum(axis=1) - offset)], "cross")  # [N, C]
        nearest = b.reduce("ReduceMin", cross, 1, keepdims=column, hint="nearest")
        return b.node("Add", [b.reduce("ReduceSumSquare", y, 1, keepdims=column, hint="whitened_sq"), nearest], "mahalanobis")
