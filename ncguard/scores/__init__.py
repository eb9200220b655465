"""OOD scores. Convention: higher = more likely OOD.

Every score is a `Detector` (ncguard.scores.base: the one contract: layers it reads, fit, score,
calibrate, is_ood, explain, build_graph), one file per score holding both its NumPy formula and its
ONNX graph. `SCORES` lists the single scores, `Fused` ("fused") combines them, and `build_detector`
is the one place that turns a score name and a run's statistics into the detector every path fits
(training's default, `ncguard export`, `ncguard fit`, `ncguard evaluate --all-scores`, benchmarks).
Adding a score is one new file here (a `Detector` subclass with its own `name`) plus its tests:
`SCORES` finds it (`discover_scores`).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..errors import ConfigError
from ..stats import StatisticsBundle
from .base import LOGITS, Detector, classifier_layer, one_layer
from .defaults import default_score
from .fused import Fused, fused_components


def discover_scores(package: ModuleType) -> dict[str, type[Detector]]:
    """{name: class} of every single score defined in `package`'s modules: each `Detector` subclass
    that sets its own `name` (`Fused`, the combination, is not a single score).

    Found by importing the package's modules rather than listed by hand, so that adding a score is
    one new file: nothing else to edit, and no list that can silently miss a score.
    """
    found: dict[str, type[Detector]] = {}
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for value in vars(module).values():
            if not (isinstance(value, type) and issubclass(value, Detector) and value.__module__ == module.__name__):
                continue
            if value is Fused or "name" not in vars(value):
                continue
            if value.name in found and found[value.name] is not value:
                raise ConfigError(f"two scores are named {value.name!r}: {found[value.name].__module__} and {module.__name__}")
            found[value.name] = value
    return dict(sorted(found.items()))


_DISCOVERED = discover_scores(importlib.import_module(__name__))
# Single-layer scores, fitted on any one layer's statistics: the standard detectors, what
# `build_detector` and the benchmarks' oracles iterate over.
SCORES: dict[str, type[Detector]] = {name: cls for name, cls in _DISCOVERED.items() if not cls.needs_joint_statistics}
# Scores that read several layers and need a bundle's joint statistics of them
# (`conditional-mahalanobis`): parts of a `fused` combination ("block3:conditional-mahalanobis").
JOINT_SCORES: dict[str, type[Detector]] = {name: cls for name, cls in _DISCOVERED.items() if cls.needs_joint_statistics}
COMPONENT_SCORES: dict[str, type[Detector]] = {**SCORES, **JOINT_SCORES}  # what a fused component may name
SCORE_NAMES = (*sorted(SCORES), Fused.name)  # every name `build_detector` takes


def make_detector(name: str, **kwargs) -> Detector:
    """A new, unfitted detector `name`, a single score or a multi-layer fused component
    (`COMPONENT_SCORES`; ConfigError if unknown or given bad options)."""
    if name not in COMPONENT_SCORES:
        raise ConfigError(f"unknown score {name!r}; choose one of: {', '.join(sorted(COMPONENT_SCORES))}")
    try:
        return COMPONENT_SCORES[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for score {name!r}: {exc}") from exc


def build_detector(
    name: str | None,
    statistics: StatisticsBundle,
    *,
    layer: str | None = None,
    components=None,
    combine: str | None = None,
    head: str | None = None,
) -> Detector:
    """The unfitted detector for score `name` on `statistics`, with the layers it reads decided.

    `name` None: the default of `head` (ncguard.scores.defaults). A feature score reads `layer`, by
    default the one the classifier acts on (`classifier_layer`: "detection" for a trained run);
    "fused" reads its `components` ("block1:mahalanobis,..." or pairs) combined by `combine` ("sum"
    unless named); without components, `fused.default_fused` decides both. Everything
    is checked against the statistics here, before any pass over data, and `detector.layers` says
    which features `fit` (held-out ones, for "fused") and `score` need.
    """
    name = name or default_score(head)
    if name not in SCORE_NAMES:
        raise ConfigError(f"unknown score {name!r}; choose one of: {', '.join(SCORE_NAMES)}")
    if name == Fused.name:
        if layer is not None:
            raise ConfigError("--layer does not apply to --score fused: name the layers in --components")
        components, combine = fused_components(statistics, components, combine)
        return Fused(components=components, combine=combine)
    if components is not None or combine is not None:
        raise ConfigError("--components and --combine apply to --score fused only")
    if not SCORES[name].uses_features:
        return make_detector(name)
    chosen = layer or classifier_layer(statistics)
    if chosen is None:
        raise ConfigError(f"name the layer to score: the statistics hold {', '.join(statistics.layers)} and no 'detection' layer")
    if chosen not in statistics.layers:
        raise ConfigError(f"the statistics have no layer {chosen!r}; they hold: {', '.join(statistics.layers)}")
    return make_detector(name, layer=chosen)


__all__ = [
    "LOGITS", "SCORES", "SCORE_NAMES", "Detector", "Fused", "build_detector", "classifier_layer", "discover_scores",
    "make_detector", "one_layer",
]
