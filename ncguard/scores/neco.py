"""Neural-collapse-based OOD detection (Ben Ammar, Belkhir, Popescu, Manzanera & Franchi,
"NECO: NEural Collapse Based Out-of-distribution detection", ICLR 2024, arXiv:2310.06823)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import TINY_NORM, Detector


class NECO(Detector):
    """score = -( ||P_d s(h)|| / ||s(h)|| ) * max_c f_c.

    s(h) = (h - mean) / std standardises each feature with the ID statistics (the authors'
    code fits a StandardScaler first; zero-variance features keep scale 1, as scikit-learn
    does). P_d projects on the first d principal components of the standardised ID features
    (from the statistics' moments, i.e. all training features). ID features lie in that
    subspace and OOD features are nearly orthogonal to it (the paper's NC5), so the ratio is
    close to 1 for ID. As in the paper it is multiplied by the max logit
    (`use_max_logit=False` gives the bare ratio, which the authors' code uses for ResNets).
    Negated so that higher = more OOD.

    d: the authors set it near the dimension of the simplex ETF the class means collapse to,
    which spans C - 1 directions once centred; so d = C - 1 by default, kept within 1..D-1 so
    a residual exists.
    """

    name = "neco"
    uses_features = True
    uses_logits = True

    def __init__(self, n_components: int | None = None, use_max_logit: bool = True, layer: str | None = None) -> None:
        self.n_components = n_components
        self.use_max_logit = use_max_logit
        self.layer = layer

    def _fit(self, stats, weight, bias):
        n_classes, width = stats.means_.shape
        if width < 2:
            raise ConfigError("neco needs features at least 2 wide")
        n_components = min(max(n_classes - 1, 1), width - 1) if self.n_components is None else self.n_components
        if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components < width:
            raise ConfigError(f"neco needs 1 <= n_components < feature width {width}, got {n_components!r}")
        scale = np.where(stats.feature_std_ > 0, stats.feature_std_, 1.0)
        total_covariance = stats.second_moment_ - np.outer(stats.global_mean_, stats.global_mean_)
        standardised = total_covariance / np.outer(scale, scale)
        _, eigenvectors = np.linalg.eigh((standardised + standardised.T) / 2)  # ascending
        self.mean_ = stats.global_mean_.copy()
        self.scale_ = scale
        self.components_ = eigenvectors[:, ::-1][:, :n_components].T.copy()  # [d, D], largest first
        self.n_classes_ = n_classes

    def _feature_width(self):
        return self.mean_.shape[0]

    def _logit_width(self):
        return self.n_classes_

    def _score(self, features, logits):
        standardised = (features - self.mean_) / self.scale_
        ratio = np.linalg.norm(standardised @ self.components_.T, axis=1) / np.maximum(
            np.linalg.norm(standardised, axis=1), TINY_NORM
        )
        if self.use_max_logit:
            ratio = ratio * logits.max(axis=1)
        return -ratio

    def _graph(self, b, features, logits):
        centred = b.node("Sub", [features, b.constant("mean", self.mean_)])
        standardised = b.node("Div", [centred, b.constant("scale", self.scale_)], "standardised")
        projected = b.node("MatMul", [standardised, b.constant("components_t", self.components_.T)], "principal")
        norm = b.node("Max", [b.reduce("ReduceL2", standardised, 1), b.constant("tiny_norm", TINY_NORM)])
        ratio = b.node("Div", [b.reduce("ReduceL2", projected, 1), norm], "ratio")
        if self.use_max_logit:
            ratio = b.node("Mul", [ratio, b.reduce("ReduceMax", logits, 1, hint="max_logit")], "ratio_times_max_logit")
        return b.neg(ratio)
