"""The common shape of every OOD score: fit on class statistics, score features and/or logits.

Convention everywhere: higher score = more likely out-of-distribution. Learned state lives in
attributes ending in `_` so `params()` can hand exactly those arrays to the ONNX exporter.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import ConfigError, DataError
from ..stats import ClassStatistics

# Smallest norm treated as non-zero when normalising: keeps a zero vector at cosine 0
# instead of producing NaN.
TINY_NORM = 1e-12


def logsumexp(values: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(values))) for [N, C], shifted by the row maximum so it cannot overflow.

    Written in NumPy rather than imported from scipy.special because scipy is not a declared
    dependency of the torch-free core, and the tests check this against scipy independently.
    """
    top = values.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(axis=1, keepdims=True)))[:, 0]


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, TINY_NORM)


def check_array(values: np.ndarray | None, what: str, width: int | None = None) -> np.ndarray:
    """Validate a [N, width] float input and return it as float64."""
    if values is None:
        raise DataError(f"this score needs {what}, but none were given")
    array = np.asarray(values)
    if array.ndim != 2:
        raise DataError(f"{what} must be a 2-D array [N, width], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{what} must be numbers, got dtype {array.dtype}")
    if width is not None and array.shape[1] != width:
        raise DataError(f"{what} have width {array.shape[1]}, but the score was fitted on width {width}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise DataError(f"{what} contain NaN or infinite values")
    return array


def check_classifier(
    weight: np.ndarray | None, bias: np.ndarray | None, n_classes: int, width: int, score: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate the linear classifier (logits = f @ W.T + b); a missing bias means zeros."""
    if weight is None:
        raise ConfigError(f"the {score!r} score needs the classifier weight [C, D]")
    weight = np.asarray(weight, dtype=np.float64)
    if weight.shape != (n_classes, width):
        raise DataError(f"classifier weight has shape {weight.shape}, expected [C={n_classes}, D={width}]")
    bias = np.zeros(n_classes) if bias is None else np.asarray(bias, dtype=np.float64)
    if bias.shape != (n_classes,):
        raise DataError(f"classifier bias has shape {bias.shape}, expected [C={n_classes}]")
    if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
        raise DataError("classifier weight or bias contain NaN or infinite values")
    return weight, bias


def check_statistics(stats: ClassStatistics | None, score: str) -> ClassStatistics:
    if not isinstance(stats, ClassStatistics) or not hasattr(stats, "means_"):
        raise ConfigError(f"the {score!r} score is fitted on finalized ClassStatistics")
    return stats


class Detector:
    """Base class. Subclasses set `name` and the inputs they read, and implement `_fit`/`_score`.

    `fit(stats, weight, bias)` learns everything from the class statistics (and classifier),
    never from OOD data; `score(features=..., logits=...)` returns float64 [N], higher = more OOD.
    """

    name: ClassVar[str]
    uses_features: ClassVar[bool] = False
    uses_logits: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True

    def fit(
        self,
        stats: ClassStatistics | None,
        weight: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> "Detector":
        if self.needs_fit:
            self._fit(check_statistics(stats, self.name), weight, bias)
        self.fitted_ = True
        return self

    def _fit(self, stats: ClassStatistics, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
        raise NotImplementedError

    def score(self, features: np.ndarray | None = None, logits: np.ndarray | None = None) -> np.ndarray:
        if self.needs_fit and not getattr(self, "fitted_", False):
            raise ConfigError(f"the {self.name!r} score must be fitted before scoring: call fit(stats, ...)")
        features = check_array(features, "features", self._feature_width()) if self.uses_features else None
        logits = check_array(logits, "logits", self._logit_width()) if self.uses_logits else None
        if features is not None and logits is not None and features.shape[0] != logits.shape[0]:
            raise DataError(f"got {features.shape[0]} feature rows but {logits.shape[0]} logit rows")
        return np.asarray(self._score(features, logits), dtype=np.float64)

    def _score(self, features: np.ndarray | None, logits: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _feature_width(self) -> int | None:
        return None

    def _logit_width(self) -> int | None:
        return None

    def params(self) -> dict[str, np.ndarray]:
        """Every learned array (attributes ending in `_`), for export to ONNX."""
        return {
            name: np.asarray(value)
            for name, value in sorted(vars(self).items())
            if name.endswith("_") and not name.startswith("_") and name != "fitted_"
        }

    def __repr__(self) -> str:
        hyper = {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}
        args = ", ".join(f"{k}={v!r}" for k, v in hyper.items())
        return f"{type(self).__name__}({args})"
