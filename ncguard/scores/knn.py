"""Deep nearest neighbours (Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep
Nearest Neighbors", ICML 2022)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from .base import Detector, l2_normalize

# Sun et al. use k = 50 on CIFAR-10 (50k training images) and k = 1000 on ImageNet (1.28M),
# i.e. the k-th neighbour sits at about 1/1000 of the reference set; with an alpha-fraction
# random subsample they scale k by alpha (k = 10 for 1% of ImageNet). On a bank of K random
# training features that gives k = K/1000, floored at 1.
NEIGHBOUR_FRACTION = 1e-3
ROWS_PER_BLOCK = 4096  # bounds the [rows, K] similarity block in memory


def default_k(bank_size: int) -> int:
    """k for a bank of `bank_size` features, following the paper's subsampling rule."""
    return max(1, int(round(NEIGHBOUR_FRACTION * bank_size)))


class KNN(Detector):
    """score = || z/||z|| - b_(k) ||, the distance to the k-th nearest L2-normalized bank feature.

    The bank is the statistics' uniform sample of training features (`ClassStatistics.bank_`),
    normalized once at fit. k defaults to max(1, round(K / 1000)) for a bank of K (see
    `default_k`: the paper's neighbour rank as a fraction of the reference set, k ~ N/1000, with
    its rule for subsampled banks, k scaled by the sampling fraction). For unit vectors the
    distance is sqrt(2 - 2 cos), computed from one matrix product as the ONNX graph does
    (matmul + top-k), which is why this is NumPy rather than scikit-learn's NearestNeighbors.
    """

    name = "knn"
    uses_features = True

    def __init__(self, k: int | None = None, layer: str | None = None) -> None:
        self.k = k
        self.layer = layer

    def _fit(self, stats, weight, bias):
        bank_size = stats.bank_.shape[0]
        if bank_size == 0:
            raise DataError("the knn score needs a feature bank; fit the statistics with bank_size > 0")
        k = default_k(bank_size) if self.k is None else self.k
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= bank_size:
            raise ConfigError(f"knn k must be an integer in 1..{bank_size} (the bank size), got {k!r}")
        self.k_ = int(k)
        self.bank_ = l2_normalize(stats.bank_)

    def _feature_width(self):
        return self.bank_.shape[1]

    def _score(self, features, logits):
        queries = l2_normalize(features)
        out = np.empty(queries.shape[0])
        for start in range(0, queries.shape[0], ROWS_PER_BLOCK):
            block = queries[start : start + ROWS_PER_BLOCK]
            similarity = block @ self.bank_.T
            # k-th nearest = k-th largest cosine similarity.
            kth = -np.partition(-similarity, self.k_ - 1, axis=1)[:, self.k_ - 1]
            out[start : start + ROWS_PER_BLOCK] = np.sqrt(np.clip(2.0 - 2.0 * kth, 0.0, None))
        return out

    def _graph(self, b, features, logits):
        similarity = b.node("MatMul", [b.l2_normalize(features), b.constant("bank_t", self.bank_.T)], "similarity")
        top, _ = b.node("TopK", [similarity, b.constant("k", [self.k_], np.int64)], "top_similarity", n_outputs=2, axis=1, largest=1)
        kth = b.node("Gather", [top, b.constant("kth_index", self.k_ - 1, np.int64)], "kth_similarity", axis=1)
        two = b.constant("two", 2.0)
        squared = b.node("Sub", [two, b.node("Mul", [kth, two])], "squared_distance")
        return b.node("Sqrt", [b.node("Max", [squared, b.constant("zero", 0.0)])], "knn")
