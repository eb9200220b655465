"""A multi-layer OOD score: several existing scores, each standardized on held-out ID data, combined.

Why: per-channel [mean, std] statistics of early conv blocks (Mahalanobis on "block1", ...) catch
noise and far-OOD inputs almost perfectly, while the detection-layer score (etf) is best on
semantic OOD; no single layer wins everywhere. The idea is the feature ensemble of Lee, Lee, Lee &
Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks" (NeurIPS 2018), which weights layers with a regressor fitted on OOD validation data. We
never use OOD data: each component is standardized with its mean and standard deviation on held-out
in-distribution data, and the components get equal weights.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..stats import ClassStatistics
from .base import Detector, check_array

COMBINES = ("sum", "max")
LOGITS = "logits"  # the layer name of components whose base score reads only the logits
HEAD_LAYERS = ("transfer", "detection", LOGITS)  # every other statistics layer is a conv block
BLOCK_SCORE, DETECTION_SCORE = "mahalanobis", "ddu"


def component_layers(components) -> tuple[str, ...]:
    """The distinct feature layers the components read, in order (Fused.layers_ after fitting)."""
    return tuple(dict.fromkeys(layer for layer, _ in components if layer != LOGITS))


def default_components(layers: Sequence[str], detection_layer: str = "detection") -> tuple[tuple[str, str], ...]:
    """The default of `ncguard train` and `ncguard export`: Mahalanobis on the first and the last conv
    block among `layers`, plus DDU on the detection layer.

    Chosen by benchmarks/quality (results in benchmarks/results/quality.md): on Fashion-MNIST it was
    the one candidate that beat the best standard score of the plain model on every OOD set. The
    first block sees pixel statistics (noise, photos, contrast), the last block shapes, DDU the classes.
    """
    blocks = [layer for layer in layers if layer not in HEAD_LAYERS and layer != detection_layer]
    chosen = list(dict.fromkeys([blocks[0], blocks[-1]])) if blocks else []
    return (*((block, BLOCK_SCORE) for block in chosen), (detection_layer, DETECTION_SCORE))


def _registry():
    from . import SCORES  # the package imports this module, so look the registry up late

    return SCORES


def parse_components(text: str) -> tuple[tuple[str, str], ...]:
    """"block1:mahalanobis,detection:etf" -> (("block1", "mahalanobis"), ("detection", "etf"))."""
    components = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        layer, sep, score = part.partition(":")
        if not sep or not layer.strip() or not score.strip():
            raise ConfigError(f"fused component {part!r} must be written LAYER:SCORE, e.g. block1:mahalanobis")
        components.append((layer.strip(), score.strip()))
    if not components:
        raise ConfigError(f"no fused components in {text!r}; write e.g. block1:mahalanobis,detection:etf")
    return tuple(components)


def check_components(components, combine: str) -> tuple[tuple[str, str], ...]:
    """Validated (layer, score) pairs (ConfigError naming the problem: empty, malformed, unknown score,
    duplicate, a logit-only score on a feature layer, no feature component, bad combine)."""
    if combine not in COMBINES:
        raise ConfigError(f"fused combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if isinstance(components, str):
        components = parse_components(components)
    try:
        pairs = [tuple(pair) for pair in components]
    except TypeError:
        raise ConfigError(f"fused components must be (layer, score) pairs, got {components!r}") from None
    if not pairs:
        raise ConfigError("fused needs at least one (layer, score) component")
    scores = _registry()
    seen = set()
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(part, str) and part for part in pair):
            raise ConfigError(f"fused component {pair!r} must be a (layer, score) pair of non-empty strings")
        layer, score = pair
        if score not in scores:
            raise ConfigError(f"fused component {layer}:{score}: unknown score {score!r}; choose one of: {', '.join(sorted(scores))}")
        if pair in seen:
            raise ConfigError(f"fused component {layer}:{score} is listed twice")
        seen.add(pair)
        if not scores[score].uses_features and layer != LOGITS:
            raise ConfigError(f"fused component {layer}:{score}: {score!r} reads only the logits; write it as {LOGITS}:{score}")
        if scores[score].uses_features and layer == LOGITS:
            raise ConfigError(f"fused component {layer}:{score}: {score!r} reads features; name the layer it reads")
    if all(layer == LOGITS for layer, _ in pairs):
        raise ConfigError("fused needs at least one feature-based component (a layer:score with a feature score)")
    return tuple(pairs)  # type: ignore[return-value]


class Fused(Detector):
    """s(x) = combine_l ( (s_l(x) - mu_l) / sigma_l ), combine = "sum" (default) or "max".

    Each component l is (layer, base score name): s_l is that existing detector fitted on that
    layer's ClassStatistics (the component on `classifier_layer`, normally "detection", also gets
    the classifier weight/bias, as export.detectors.fit_detector does; logit-only scores are
    written "logits:energy"). mu_l and sigma_l are the mean and (population) standard deviation of
    s_l on held-out in-distribution data: no OOD data is ever used, and the components get equal
    weights (Lee et al. 2018 instead weight layers by a regressor fitted on OOD validation data).

    Fitted with `fit_layers` (it needs the calibration features, which `fit(stats)` cannot give).
    As a `Detector` it reads one features matrix, the concatenation of `layers_` in that order
    (what the ONNX graph reads), plus the logits; `score_layers` takes the layers by name.
    """

    name = "fused"
    uses_features = True
    uses_logits = True

    def __init__(self, components: Sequence[tuple[str, str]] | str | None = None, combine: str = "sum"):
        """`components` None: `default_components` of the layers `fit_layers` is given."""
        self.components = components
        self.combine = combine

    def fit(self, stats, weight=None, bias=None):
        raise ConfigError(
            "the 'fused' score combines several layers and is standardized on held-out ID data: "
            "fit it with fit_layers(stats_by_layer, weight, bias, classifier_layer, calibration, calibration_logits)"
        )

    def fit_layers(
        self,
        stats: Mapping[str, ClassStatistics],
        weight: np.ndarray | None,
        bias: np.ndarray | None,
        classifier_layer: str,
        calibration: Mapping[str, np.ndarray],
        calibration_logits: np.ndarray,
    ) -> "Fused":
        """Fit every component on its layer's statistics, then mu_l, sigma_l on the calibration data."""
        from . import make_detector

        chosen = default_components(tuple(stats), classifier_layer) if self.components is None else self.components
        components = check_components(chosen, self.combine)
        layers: list[str] = []
        detectors: list[Detector] = []
        for layer, score in components:
            detector = make_detector(score)
            if layer == LOGITS:
                detectors.append(detector.fit(None, weight, bias))
                continue
            if layer not in stats:
                raise ConfigError(f"fused component {layer}:{score}: the statistics have no layer {layer!r}; they hold: {', '.join(stats)}")
            w, b = (weight, bias) if layer == classifier_layer else (None, None)
            try:
                detectors.append(detector.fit(stats[layer], w, b))
            except ConfigError as exc:
                raise ConfigError(f"fused component {layer}:{score} cannot be fitted: {exc} (the classifier acts on {classifier_layer!r})") from exc
            if layer not in layers:
                layers.append(layer)
        self.components_ = components
        self.detectors_ = detectors
        self.layers_ = tuple(layers)
        self.widths_ = np.array([stats[layer].means_.shape[1] for layer in layers], dtype=np.int64)

        missing = [layer for layer in layers if layer not in calibration]
        if missing:
            raise DataError(f"the calibration features lack layer(s) {', '.join(missing)}")
        raw = self._component_scores(self.concatenate(calibration), check_array(calibration_logits, "calibration logits"))
        if raw.shape[0] < 2:
            raise DataError(f"fused needs at least 2 held-out ID rows to standardize its components, got {raw.shape[0]}")
        mu, sigma = raw.mean(axis=0), raw.std(axis=0)
        flat = ~(sigma > 0) | ~np.isfinite(sigma)
        if np.any(flat):
            names = ", ".join(f"{layer}:{score}" for (layer, score), bad in zip(components, flat) if bad)
            raise DataError(f"fused component(s) {names} score every held-out ID input the same (sigma 0): they cannot be standardized")
        self.mu_ = mu
        self.sigma_ = sigma
        self.fitted_ = True
        return self

    # ------------------------------------------------------------------ scoring

    def concatenate(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """The features matrix `score` reads: features[l] for l in `layers_`, side by side."""
        parts = []
        for layer, width in zip(self.layers_, self.widths_):
            if layer not in features:
                raise DataError(f"the fused score needs the features of layer {layer!r}; got {', '.join(features) or 'none'}")
            parts.append(check_array(features[layer], f"{layer} features", int(width)))
        return np.concatenate(parts, axis=1)

    def score(self, features: np.ndarray | None = None, logits: np.ndarray | None = None) -> np.ndarray:
        """Scores [N] from the concatenated features (`layers_` side by side) and the logits."""
        self._require_fitted()
        return super().score(features=features, logits=logits)

    def score_layers(self, features: Mapping[str, np.ndarray], logits: np.ndarray) -> np.ndarray:
        """Scores [N] from the features of each layer by name (same as `score` on their concatenation)."""
        self._require_fitted()
        return self.score(features=self.concatenate(features), logits=logits)

    def component_scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The standardized components [N, L], (s_l - mu_l) / sigma_l, before they are combined."""
        self._require_fitted()
        features = check_array(features, "features", self._feature_width())
        logits = check_array(logits, "logits")
        return (self._component_scores(features, logits) - self.mu_) / self.sigma_

    def slices(self) -> dict[str, tuple[int, int]]:
        """{layer: (start, stop)} columns of the concatenated features (the ONNX graph slices the same)."""
        stops = np.cumsum(self.widths_)
        return {layer: (int(stop - width), int(stop)) for layer, width, stop in zip(self.layers_, self.widths_, stops)}

    def _component_scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if features.shape[0] != logits.shape[0]:
            raise DataError(f"got {features.shape[0]} feature rows but {logits.shape[0]} logit rows")
        slices = self.slices()
        columns = []
        for (layer, _), detector in zip(self.components_, self.detectors_):
            part = None if layer == LOGITS else features[:, slice(*slices[layer])]
            columns.append(detector.score(features=part, logits=logits))
        return np.stack(columns, axis=1)

    def _score(self, features, logits):
        standardized = (self._component_scores(features, logits) - self.mu_) / self.sigma_
        return standardized.sum(axis=1) if self.combine == "sum" else standardized.max(axis=1)

    def _require_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise ConfigError("the 'fused' score must be fitted before scoring: call fit_layers(...)")

    def _feature_width(self):
        return int(self.widths_.sum())

    def params(self) -> dict[str, np.ndarray]:
        """The numeric learned arrays (mu_, sigma_, widths_); the components' own live in `detectors_`."""
        return {"mu_": np.asarray(self.mu_), "sigma_": np.asarray(self.sigma_), "widths_": np.asarray(self.widths_)}

    def describe(self) -> dict:
        """JSON-ready record of the fitted score (for model metadata)."""
        self._require_fitted()
        return {
            "combine": self.combine,
            "components": [
                {"layer": layer, "score": score, "mu": float(mu), "sigma": float(sigma)}
                for (layer, score), mu, sigma in zip(self.components_, self.mu_, self.sigma_)
            ],
            "layers": list(self.layers_),
        }
