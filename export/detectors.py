"""Which layer each OOD score reads, and fitting a score's detector from a run's statistics bundle.

Shared by `ncguard export` (the score in the graph) and `ncguard evaluate --all-scores` (every
score on the same features), so both fit exactly the same detector. Torch-free.

Layer rule: every feature-based score reads the detection layer ("detection", z), the layer the
bundle's classifier (weight, bias) acts on; that keeps the scores that combine features with
logits (vim, nci, neco) consistent with the classifier, and it is the layer whose collapse the
dual head controls. Another layer can be named explicitly (e.g. "transfer" for Mahalanobis on h).
A bundle with a single layer uses that one.

The "fused" score (ncguard.scores.fused) reads several layers and is standardized on held-out ID
features, so it is fitted here from the bundle plus those features (`fit_fused`); its default
components are ncguard.scores.fused.default_components of the statistics' layers.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ncguard.errors import ConfigError
from ncguard.scores import SCORES, Detector, Fused, make_detector
from ncguard.scores.fused import check_components, default_components
from ncguard.stats import StatisticsBundle

DETECTION_LAYER = "detection"
TRANSFER_LAYER = "transfer"
FUSED = Fused.name


def score_layer(bundle: StatisticsBundle, layer: str | None = None) -> str:
    """The statistics layer a feature-based score reads (module docstring)."""
    if layer is not None:
        if layer not in bundle.layers:
            raise ConfigError(f"the statistics have no layer {layer!r}; they hold: {', '.join(bundle.layers)}")
        return layer
    if DETECTION_LAYER in bundle.layers:
        return DETECTION_LAYER
    if len(bundle.layers) == 1:
        return next(iter(bundle.layers))
    raise ConfigError(f"name the layer to score: the statistics hold {', '.join(bundle.layers)} and no {DETECTION_LAYER!r} layer")


def fit_detector(name: str, bundle: StatisticsBundle, layer: str | None = None) -> tuple[Detector, str | None]:
    """(fitted detector, the layer its features come from, None for logit-only scores)."""
    if name not in SCORES:
        raise ConfigError(f"unknown score {name!r}; choose one of: {', '.join(sorted(SCORES))}")
    detector = make_detector(name)
    if not detector.uses_features:
        return detector.fit(None, bundle.weight, bundle.bias), None
    chosen = score_layer(bundle, layer)
    uses_classifier = chosen == score_layer(bundle)  # the classifier acts on the default layer only
    weight, bias = (bundle.weight, bundle.bias) if uses_classifier else (None, None)
    try:
        return detector.fit(bundle.layers[chosen], weight, bias), chosen
    except ConfigError as exc:
        if uses_classifier:
            raise
        raise ConfigError(f"the {name!r} score cannot read layer {chosen!r}: {exc} (the classifier acts on {score_layer(bundle)!r})") from exc


def fused_components(bundle: StatisticsBundle, components=None, combine: str = "sum") -> tuple[tuple[str, str], ...]:
    """Validated fused components: the given ones ("block1:mahalanobis,..." or pairs), or the default
    (ncguard.scores.fused.default_components). ConfigError names what is wrong,
    including a layer the run's statistics do not hold."""
    if components is None or components == "":
        components = default_components(tuple(bundle.layers), score_layer(bundle))
    components = check_components(components, combine)
    for layer, score in components:
        if layer != "logits" and layer not in bundle.layers:
            raise ConfigError(
                f"fused component {layer}:{score}: the run's statistics have no layer {layer!r}; "
                f"they hold: {', '.join(bundle.layers)}"
            )
    return components


def fit_fused(
    bundle: StatisticsBundle,
    components,
    combine: str,
    calibration: Mapping[str, np.ndarray],
    calibration_logits: np.ndarray,
) -> Fused:
    """The fused detector, its components fitted on the bundle and standardized on held-out ID features."""
    components = fused_components(bundle, components, combine)
    return Fused(components=components, combine=combine).fit_layers(
        bundle.layers, bundle.weight, bundle.bias, score_layer(bundle), calibration, calibration_logits
    )
