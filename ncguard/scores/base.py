"""The one detector contract every OOD score follows (`Detector`), and the helpers the formulas share.

Convention everywhere: higher score = more likely out-of-distribution. Learned state lives in
attributes ending in `_`; the threshold too (`threshold_`), so a detector can say "is OOD" itself.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np

from ..calibration import DEFAULT_TPR, calibrate_threshold
from ..errors import ConfigError, DataError
from ..stats import ClassStatistics, StatisticsBundle

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


LOGITS = "logits"  # the entry of a `{layer: features}` mapping that holds the logits
ONE_LAYER = "features"  # the layer name `one_layer` gives a lone ClassStatistics


def one_layer(stats: ClassStatistics, weight=None, bias=None, layer: str = ONE_LAYER) -> StatisticsBundle:
    """A bundle of one layer's statistics with the classifier acting on it (weight/bias may be None).

    The shorthand for a model with one feature tensor (bring your own model, tests): the detector
    then reads `layer`, and `score(features=array)` means `score({layer: array})`.
    """
    if not isinstance(stats, ClassStatistics) or not hasattr(stats, "means_"):
        raise ConfigError("scores are fitted on finalized ClassStatistics (call fit or finalize first)")
    n_classes = int(stats.means_.shape[0])
    return StatisticsBundle(
        layers={layer: stats}, weight=weight, bias=bias, classes=tuple(str(c) for c in range(n_classes)),
        meta={"classifier_layer": layer},
    )


def classifier_layer(bundle: StatisticsBundle) -> str | None:
    """The layer the bundle's classifier (weight, bias) acts on: its meta's `classifier_layer`, else
    "detection" when present (a DualHeadModel's z), else the only layer; None if none of these."""
    named = bundle.meta.get("classifier_layer")
    if named in bundle.layers:
        return named
    if "detection" in bundle.layers:
        return "detection"
    return next(iter(bundle.layers)) if len(bundle.layers) == 1 else None


def _as_bundle(statistics, layer: str | None = None, score: str = "fused") -> StatisticsBundle:
    """A bundle as is; a lone ClassStatistics as the one layer `layer` (default ONE_LAYER), no classifier."""
    if isinstance(statistics, StatisticsBundle):
        return statistics
    return one_layer(check_statistics(statistics, score), layer=layer or ONE_LAYER)


class Detector:
    """The contract every OOD score follows (DESIGN.md section 1, "Detector contract").

    - It names what it reads: `layers`, the entries of the `{layer: features}` mapping it scores
      ("logits" for the logits). A feature score reads one statistics layer, `layer` (None: the
      layer the bundle's classifier acts on, `classifier_layer`), decided at `fit` (`layer_`).
    - `fit(statistics, held_out=None)` learns everything from a `StatisticsBundle` (the streamed class
      statistics and the classifier; a lone ClassStatistics is taken as a one-layer bundle) plus, for
      detectors that need them (`needs_held_out`), held-out ID features as a `{layer: features}`
      mapping; never from OOD data. It returns self; learned state ends in `_`; `__init__` only
      stores hyperparameters (scikit-learn's conventions, so detectors can be cloned and compared).
    - `score(features, logits=None)` returns float64 [N], higher = more OOD. `features` is the
      `{layer: features}` mapping (the logits under "logits", or given as `logits=`); a detector that
      reads one layer also takes that layer's array itself.
    - `calibrate(held_out, tpr)` sets `threshold_` (`ncguard.calibration.calibrate_threshold`) from
      held-out ID scores or features; `is_ood(...)` is then `score > threshold_`, as served.
    - `component_names()` / `component_scores(...)` explain a score by its parts ([N, K]; a single
      score is its own one component; `Fused` gives each part's weighted standardized score).
    - `build_graph(builder, inputs)` writes the same formula as ONNX nodes (`ncguard.scores.graph`):
      each score's NumPy formula (`_score`) and its graph (`_graph`) live in the same file, and the
      parity tests (tests/test_export_score_graph.py) hold the two together.
    Subclasses set `name` and the inputs they read, and implement `_fit`, `_score` and `_graph`.
    """

    name: ClassVar[str]
    uses_features: ClassVar[bool] = False
    uses_logits: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    needs_held_out: ClassVar[bool] = False  # fit needs held-out ID features (see `layers`)
    needs_class_covariances: ClassVar[bool] = False  # fit needs per-class covariances in the statistics
    needs_joint_statistics: ClassVar[bool] = False  # fit needs a StatisticsBundle's joint statistics of several layers
    # c such that c * score is -log p(input) up to a constant, for a score that is a Gaussian density's
    # negative log (or a squared Mahalanobis distance, c = 1/2); None for every other score. `fused`'s
    # "joint" combine adds such scores in these units, as one density over all their layers.
    log_density_scale: ClassVar[float | None] = None
    layer: str | None = None  # hyperparameter of feature scores (their __init__ takes it)

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer

    # ------------------------------------------------------------------ what it reads

    @property
    def layers(self) -> tuple[str, ...]:
        """The entries of the `{layer: features}` mapping this detector reads, "logits" last."""
        reads = (self._feature_layer(),) if self.uses_features else ()
        return reads + ((LOGITS,) if self.uses_logits else ())

    def _feature_layer(self) -> str:
        layer = getattr(self, "layer_", None) or self.layer
        if layer is None:
            raise ConfigError(
                f"the {self.name!r} score reads the layer the classifier acts on, known once fitted: "
                f"fit it first or name the layer ({type(self).__name__}(layer=...))"
            )
        return layer

    # ------------------------------------------------------------------ fit

    def fit(self, statistics: StatisticsBundle | ClassStatistics | None = None, held_out: Mapping[str, np.ndarray] | None = None) -> "Detector":
        """Learn from the class statistics (module docstring); returns self."""
        if not self.uses_features:
            self.fitted_ = True
            return self
        if statistics is None:
            raise ConfigError(f"the {self.name!r} score is fitted on finalized ClassStatistics")
        bundle = _as_bundle(statistics, self.layer, self.name)
        layer = self.layer or classifier_layer(bundle)
        if layer is None:
            raise ConfigError(f"name the layer the {self.name!r} score reads: the statistics hold {', '.join(bundle.layers)} and no 'detection' layer")
        if layer not in bundle.layers:
            raise ConfigError(f"the statistics have no layer {layer!r}; they hold: {', '.join(bundle.layers)}")
        on_classifier = layer == classifier_layer(bundle)
        weight, bias = (bundle.weight, bundle.bias) if on_classifier else (None, None)
        try:
            self._fit(check_statistics(bundle.layers[layer], self.name), weight, bias)
        except ConfigError as exc:
            if on_classifier:
                raise
            raise ConfigError(f"the {self.name!r} score cannot read layer {layer!r}: {exc} (the classifier acts on {classifier_layer(bundle)!r})") from exc
        self.layer_ = layer
        self.fitted_ = True
        return self

    def _fit(self, stats: ClassStatistics, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
        raise NotImplementedError

    def _require_fitted(self) -> None:
        if self.needs_fit and not getattr(self, "fitted_", False):
            raise ConfigError(f"the {self.name!r} score must be fitted before scoring: call fit(statistics)")

    # ------------------------------------------------------------------ score

    def _mapping(self, features, logits) -> dict:
        """The `{layer: features}` mapping from either form `score` accepts."""
        if isinstance(features, Mapping):
            layers = dict(features)
        elif features is None:
            layers = {}
        elif self.uses_features:
            layers = {self._feature_layer(): features}
        else:
            layers = {}  # a logit-only score ignores features given as an array
        if logits is not None:
            if LOGITS in layers:
                raise DataError("the logits were given twice: in the features mapping and as logits=")
            layers[LOGITS] = logits
        return layers

    def score(self, features: Mapping[str, np.ndarray] | np.ndarray | None = None, logits: np.ndarray | None = None) -> np.ndarray:
        """Scores [N] (float64, higher = more OOD) of `{layer: features}` (module docstring)."""
        self._require_fitted()
        layers = self._mapping(features, logits)
        features = check_array(self._feature_input(layers), "features", self._feature_width()) if self.uses_features else None
        logits = check_array(layers.get(LOGITS), "logits", self._logit_width()) if self.uses_logits else None
        if features is not None and logits is not None and features.shape[0] != logits.shape[0]:
            raise DataError(f"got {features.shape[0]} feature rows but {logits.shape[0]} logit rows")
        return np.asarray(self._score(features, logits), dtype=np.float64)

    def _feature_input(self, layers: Mapping[str, np.ndarray]):
        """The features `_score` reads, from the `{layer: features}` mapping: its one layer's."""
        return layers.get(self._feature_layer())

    def _score(self, features: np.ndarray | None, logits: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _feature_width(self) -> int | None:
        return None

    def _logit_width(self) -> int | None:
        return None

    # ------------------------------------------------------------------ calibrate and decide

    def calibrate(self, held_out, tpr: float = DEFAULT_TPR) -> "Detector":
        """Set `threshold_` so that `score <= threshold_` keeps `tpr` of held-out ID inputs; returns self.

        `held_out` is their scores ([N], e.g. an exported graph's own) or their features (a
        `{layer: features}` mapping, or one layer's array), scored here. Never OOD data.
        """
        if isinstance(held_out, Mapping) or np.ndim(held_out) != 1:
            held_out = self.score(held_out)
        self.threshold_ = calibrate_threshold(held_out, tpr)
        self.tpr_ = float(tpr)
        return self

    def is_ood(self, features=None, logits: np.ndarray | None = None) -> np.ndarray:
        """bool [N]: score > threshold_, the decision a served model makes."""
        if not hasattr(self, "threshold_"):
            raise ConfigError(f"the {self.name!r} detector has no threshold: call calibrate(held_out, tpr) first")
        return self.score(features, logits) > self.threshold_

    # ------------------------------------------------------------------ explain

    def component_names(self) -> list[str]:
        """"layer:score" of each part `component_scores` returns (a single score: itself)."""
        return [f"{self.layers[0]}:{self.name}"]

    def component_scores(self, features=None, logits: np.ndarray | None = None) -> np.ndarray:
        """[N, K] the parts the score is made of, in `component_names` order (a single score: [N, 1])."""
        return self.score(features, logits)[:, None]

    def describe(self) -> dict:
        """JSON-ready record of the fitted detector for model metadata (what a combination is made of)."""
        return {}

    # ------------------------------------------------------------------ ONNX

    def build_component_graph(self, builder, inputs: Mapping[str, str]) -> tuple[str, str]:
        """Append the score and its parts: (float32 [N] score, float32 [N, K] `component_scores`).

        What the exported graph's `ood_score` and `ood_components` outputs hold, so a served
        decision can say which part drove it. A single score is its own one part.
        """
        score = self.build_graph(builder, inputs)
        return score, builder.node("Unsqueeze", [score, builder.axes(1)], "ood_components")

    def build_graph(self, builder, inputs: Mapping[str, str], scale: float = 1.0, offset: float = 0.0, column: bool = False) -> str:
        """Append `scale` * this score - `offset` to `builder`'s graph (ncguard.scores.graph.GraphBuilder).

        `inputs` maps each of `layers` to a float32 [N, width] tensor of the graph; returns the
        name of the float32 score tensor, [N], or [N, 1] with `column`. `scale`, `offset` and
        `column` are what a combination needs of each part (`Fused` standardizes its parts and
        concatenates them as columns): a score that can fold them into its own constants and
        reductions does so (`_affine_graph`), because at batch 1 every node costs a few
        microseconds whatever it computes.
        """
        self._require_fitted()
        self._require_inputs(inputs)
        features = self._graph_input(builder, inputs) if self.uses_features else None
        logits = inputs.get(LOGITS) if self.uses_logits else None
        return self._affine_graph(builder, features, logits, float(scale), float(offset), bool(column))

    def _require_inputs(self, inputs: Mapping[str, str]) -> None:
        """ConfigError naming every layer of `layers` that `inputs` maps to no graph tensor."""
        missing = [layer for layer in self.layers if not inputs.get(layer)]
        if missing:
            raise ConfigError(f"the {self.name!r} score reads {', '.join(missing)}: name the tensor(s) that hold them")

    def _graph_input(self, builder, inputs: Mapping[str, str]) -> str:
        """The graph tensor `_affine_graph` reads, the graph's twin of `_feature_input`: its one layer's."""
        return inputs[self._feature_layer()]

    def _affine_graph(self, builder, features: str | None, logits: str | None, scale: float, offset: float, column: bool) -> str:
        """scale * `_graph` - offset, as [N] or [N, 1]: one node for each of the three that is not trivial."""
        score = builder.scale(self._graph(builder, features, logits), scale, hint=f"{self.name}_scaled")
        if offset:
            score = builder.node("Sub", [score, builder.constant(f"{self.name}_offset", offset)], f"{self.name}_shifted")
        return builder.node("Unsqueeze", [score, builder.axes(1)], f"{self.name}_column") if column else score

    def _graph(self, builder, features: str | None, logits: str | None) -> str:
        raise NotImplementedError

    def params(self) -> dict[str, np.ndarray]:
        """Every learned array (attributes ending in `_`, bookkeeping aside)."""
        return {
            name: np.asarray(value)
            for name, value in sorted(vars(self).items())
            if name.endswith("_") and not name.startswith("_") and name not in BOOKKEEPING
        }

    def __repr__(self) -> str:
        hyper = {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}
        args = ", ".join(f"{k}={v!r}" for k, v in hyper.items())
        return f"{type(self).__name__}({args})"


BOOKKEEPING = frozenset({"fitted_", "layer_", "threshold_", "tpr_"})  # learned, but not arrays of the formula
