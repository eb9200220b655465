"""OOD scores (NumPy reference implementations). Convention: higher = more likely OOD.

Each score is a `Detector` fitted on `ClassStatistics` (plus the linear classifier where the
score needs it); `make_detector(name)` builds one from its registry key.

`Fused` ("fused") is not in `SCORES`: every registry entry is fitted by `fit(stats, weight,
bias)` on one layer, which callers (export, fit, evaluate --all-scores, benchmarks) rely on,
while "fused" reads several layers and needs held-out ID data (`fit_layers`). It is listed in
`COMBINED_SCORES` instead.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Detector
from .ddu import DDU
from .energy import Energy
from .etf import ETF
from .fused import Fused
from .knn import KNN
from .mahalanobis import Mahalanobis
from .maxlogit import MaxLogit
from .msp import MSP
from .nci import NCI
from .neco import NECO
from .vim import ViM

SCORES: dict[str, type[Detector]] = {
    cls.name: cls for cls in (ETF, Mahalanobis, Energy, MSP, MaxLogit, KNN, DDU, ViM, NCI, NECO)
}

COMBINED_SCORES: dict[str, type[Detector]] = {Fused.name: Fused}


def make_detector(name: str, **kwargs) -> Detector:
    """A new, unfitted detector for the score `name` (ConfigError if unknown or given bad options)."""
    if name not in SCORES:
        raise ConfigError(f"unknown score {name!r}; choose one of: {', '.join(sorted(SCORES))}")
    try:
        return SCORES[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for score {name!r}: {exc}") from exc


__all__ = ["COMBINED_SCORES", "SCORES", "Detector", "Fused", "make_detector", *(cls.__name__ for cls in SCORES.values())]
