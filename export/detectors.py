"""`fit_detector(name, bundle, layer)`: a single score fitted on a run's statistics, as (detector, layer).

Kept for benchmarks/quality (being reworked under issue 16), which still imports it; new code builds
detectors with `ncguard.scores.build_detector` and fits them with `Detector.fit`, which this wraps.
"""

from __future__ import annotations

from ncguard.errors import ConfigError
from ncguard.scores import SCORES, Detector, build_detector
from ncguard.stats import StatisticsBundle


def fit_detector(name: str, bundle: StatisticsBundle, layer: str | None = None) -> tuple[Detector, str | None]:
    """(fitted detector, the layer its features come from, None for logit-only scores)."""
    if name not in SCORES:
        raise ConfigError(f"unknown score {name!r}; choose one of: {', '.join(sorted(SCORES))}")
    detector = build_detector(name, bundle, layer=layer).fit(bundle)
    return detector, getattr(detector, "layer_", None)
