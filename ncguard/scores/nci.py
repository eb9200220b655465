"""Neural-collapse-inspired detector (Liu & Qin, "Detecting Out-of-distribution through the
Lens of Neural Collapse", CVPR 2025, arXiv:2311.01479; code github.com/litianliu/NCI-OOD)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from .base import TINY_NORM, Detector, check_classifier


def proximity(features: np.ndarray, predicted: np.ndarray, global_mean: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """pScore = (h - mu_G) . w_c / ||h - mu_G|| for the predicted class c (paper eq. for pScore).

    Not divided by ||w_c||: the paper relies on equinorm weights (NC2) and its code omits it.
    """
    centred = features - global_mean
    norms = np.maximum(np.linalg.norm(centred, axis=1), TINY_NORM)
    return (centred * weight[predicted]).sum(axis=1) / norms


class NCI(Detector):
    """score = -[ (h - mu_G) . w_c / ||h - mu_G||  +  alpha * ||h||_1 ],  c = argmax logits.

    The first term (pScore) is how close the centred feature points to its predicted class's
    weight vector (ID features do, by NC1 + NC3); the second is the paper's "filter": ID
    features lie farther from the origin than OOD ones. Negated so that higher = more OOD.

    alpha: the paper tunes it on validation OOD data (OpenOOD's automatic parameter search),
    which ncguard never uses. Given explicitly, it is used as is (e.g. the paper's 1e-4 for a
    CIFAR-10 ResNet-18). By default it is set from ID data only: alpha = std(pScore) /
    std(||h||_1) over the statistics' bank, so both terms spread ID scores equally (the same
    scale-matching idea ViM uses for its virtual logit); 0 if the bank's L1 norms do not vary.
    """

    name = "nci"
    uses_features = True
    uses_logits = True

    def __init__(self, alpha: float | None = None) -> None:
        self.alpha = alpha

    def _fit(self, stats, weight, bias):
        n_classes, width = stats.means_.shape
        weight, bias = check_classifier(weight, bias, n_classes, width, self.name)
        self.global_mean_ = stats.global_mean_.copy()
        self.weight_ = weight
        if self.alpha is not None:
            if not np.isfinite(self.alpha) or self.alpha < 0:
                raise ConfigError(f"nci alpha must be a non-negative number, got {self.alpha!r}")
            self.alpha_ = float(self.alpha)
            return
        bank = stats.bank_
        if bank.shape[0] < 2:
            raise DataError("nci needs a feature bank of at least 2 samples to set alpha; or pass alpha explicitly")
        predicted = (bank @ weight.T + bias).argmax(axis=1)
        spread_p = proximity(bank, predicted, self.global_mean_, weight).std()
        spread_l1 = np.abs(bank).sum(axis=1).std()
        self.alpha_ = float(spread_p / spread_l1) if spread_l1 > 0 else 0.0

    def _feature_width(self):
        return self.global_mean_.shape[0]

    def _logit_width(self):
        return self.weight_.shape[0]

    def _score(self, features, logits):
        predicted = logits.argmax(axis=1)
        p_score = proximity(features, predicted, self.global_mean_, self.weight_)
        return -(p_score + self.alpha_ * np.abs(features).sum(axis=1))
