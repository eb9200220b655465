"""Nearest class mean on the collapsed sphere: ncguard's default candidate for the detection head."""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .base import TINY_NORM, Detector, l2_normalize


class ETF(Detector):
    """score = 1 - max_c cos(z, mu_c), with mu_c the class means of the detection features z.

    Under neural collapse (Papyan, Han & Donoho, PNAS 2020) ID features sit on their class-mean
    direction, which form a simplex ETF, so the cosine to the nearest mean is ~1 for ID inputs
    and lower for anything between or away from the classes. Range [0, 2]; 0 exactly at a mean.
    """

    name = "etf"
    uses_features = True

    def _fit(self, stats, weight, bias):
        norms = np.linalg.norm(stats.means_, axis=1)
        if np.any(norms < TINY_NORM):
            raise DataError(f"class mean(s) {np.flatnonzero(norms < TINY_NORM).tolist()} are zero: cosine undefined")
        self.unit_means_ = stats.means_ / norms[:, None]

    def _feature_width(self):
        return self.unit_means_.shape[1]

    def _score(self, features, logits):
        return 1.0 - (l2_normalize(features) @ self.unit_means_.T).max(axis=1)

    def _graph(self, b, features, logits):
        cosines = b.node("MatMul", [b.l2_normalize(features), b.constant("unit_means_t", self.unit_means_.T)], "cosines")
        return b.node("Sub", [b.constant("one", 1.0), b.reduce("ReduceMax", cosines, 1, hint="max_cosine")], "etf")
