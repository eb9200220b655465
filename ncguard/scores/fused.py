"""A multi-layer OOD score: several existing scores, each standardized on held-out ID data, combined.

Why: per-channel [mean, std] statistics of a conv block (Mahalanobis on "block3", ...) catch noise
and far-OOD inputs almost perfectly, while a detection-layer score (ddu) is best on semantic OOD;
no single layer wins everywhere. The idea is the feature ensemble of Lee, Lee, Lee &
Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks" (NeurIPS 2018), which weights layers with a regressor fitted on OOD validation data. We
never use OOD data: each component is standardized with its mean and standard deviation on held-out
in-distribution data, and the components get equal weights ("sum"), or, when every component is a
Gaussian negative log-density, the weights that make the sum one density over all their layers ("joint").
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..stats import StatisticsBundle, joint_name
from .base import LOGITS, Detector, _as_bundle, classifier_layer

COMBINES = ("sum", "max", "joint")
HEAD_LAYERS = ("transfer", "detection", LOGITS)  # every other statistics layer is a conv block
BLOCK_SCORE, DETECTION_SCORE = "mahalanobis", "ddu-lowrank"
CONDITIONED_BLOCK_SCORE = "conditional-mahalanobis"
# Fit rows per regression coefficient the default wants before it conditions the block on the head
# (`conditioned_default`): the usual 10-20 observations per coefficient of a linear regression, at the
# safe end. Digits' 1,212 rows (which conditioning fails) are far below it for the default cnn (20 x 513);
# Fashion-MNIST's 32,400-54,000 (which it helps) far above. Nothing in between was measured.
ROWS_PER_COEFFICIENT = 20


def default_components(layers: Sequence[str], detection_layer: str = "detection", every_block: bool = False) -> tuple[tuple[str, str], ...]:
    """The default of `ncguard train` and `ncguard export`: Mahalanobis on the per-channel statistics
    of the last conv block among `layers` (with `ncguard train --block-grid N`, also each channel's
    means on an N x N grid: ncguard.pooling.DEFAULT_BLOCK_GRID says why that is not the default),
    plus low-rank DDU (`ddu-lowrank`, rank 64) on the detection layer. `every_block`: Mahalanobis on
    every block instead, for `ncguard fit --features A,B,C`, where the user named the blocks (a
    trained run's statistics hold every block whether or not it is scored).

    The last block sees shapes (noise, photos, blur, contrast, rotation move its statistics by tens of
    standard deviations), DDU the classes. Why not also the first block, as until issue 16: its pixel
    statistics are noise to a semantic question. On near OOD (Fashion-MNIST classes held out of
    training) they pulled the sum below its parts (split c: AUROC 0.739 with them, 0.772 without),
    and the ID-only check agrees: on 9 proxy models that hold out *known* classes (every known class
    once; benchmarks/quality/select.py), the last block alone scores above the first and last
    together at every block weight, on every split; with DDU at weight 1 it moves from rank 359 to
    291 of 360 combinations. Far OOD holds: on the 10-class check model it beats the plain model's
    per-set oracle on 8 of 9 sets, as the former default did, and on the near-OOD models' far sets on
    24 of 27 against 21. Lower block weights, which the proxies liked better still, lost far sets
    (weight 0.25: 5 of 9), so the weight stays 1. Results: benchmarks/results/near/ and
    benchmarks/results/check/. The graph is also cheaper: block1 is the largest feature map.

    Why low-rank DDU rather than DDU (issue 16, round 3): the same density with each class covariance
    kept in a shared 64-dimensional principal subspace plus one residual variance. It costs a fraction
    of DDU in the graph (full DDU's ten 256 x 256 whitenings were the largest node), and the ID-only
    proxies prefer it (mean objective 0.667 against 0.642, better on 8 of 9 proxies; the
    `ddu_lowrank` module docstring says why). The near and far results it gave are in
    benchmarks/results/near/ and benchmarks/results/check/.

    These are the components for statistics without the joint statistic of the last block and the head,
    or with too few rows for it; `default_fused` decides, and with enough data it scores the block
    given the head instead (`conditioned_default`).
    """
    blocks = [layer for layer in layers if layer not in HEAD_LAYERS and layer != detection_layer]
    scored = blocks if every_block else blocks[-1:]
    return (*((block, BLOCK_SCORE) for block in scored), (detection_layer, DETECTION_SCORE))


def conditioned_default(statistics: StatisticsBundle, block: str, detection_layer: str) -> bool:
    """Whether the default scores `block` given the head (`block:conditional-mahalanobis`): the statistics
    hold the joint statistic `ncguard train` streams for it (the block with the detection and transfer
    layers), the classifier reads "detection" (a trained run), and the fit split had at least
    ROWS_PER_COEFFICIENT rows per coefficient of the regression of the block on the head (head width + 1)."""
    from .conditional_mahalanobis import streamed_joint

    parts = streamed_joint(tuple(statistics.layers))
    joint = statistics.joint.get(joint_name(parts)) if parts is not None and parts[0] == block else None
    if joint is None or detection_layer != "detection":
        return False
    head_width = joint.means_.shape[1] - statistics.layers[block].means_.shape[1]
    return int(joint.counts_.sum()) >= ROWS_PER_COEFFICIENT * (head_width + 1)


def default_fused(statistics: StatisticsBundle) -> tuple[tuple[tuple[str, str], ...], str]:
    """(components, combine) of the default `fused` score for these statistics: the one place it is decided.

    With the joint statistic and enough fit rows (`conditioned_default`): the last block given the head
    (`conditional-mahalanobis`, -log p(block | detection, transfer) up to a constant) plus low-rank DDU on
    the detection layer (-log p(detection)), combined "joint", i.e. added as the negative log-densities
    they are, with no weight chosen by anyone: the joint density of the three layers but for the transfer
    layer's own term, log p(transfer | detection), which no component scores. Otherwise
    `default_components`, combined "sum".

    Why (issue 16, round 8; benchmarks/results/near/conditional_study.md and README.md there): the
    unconditioned sum counts the class content twice (the block statistics move with what an image shows),
    and its equal weights after standardization are a convention, not a model. On the 9 ID-only proxy models
    (known classes held out) the joint density has the best objective of the block parts without the grid
    (0.6748 against 0.6669 for `default_components` summed; the gridded ones score higher, 0.677-0.679, but
    lose shift-blur on a bf16 model and cost a 768-wide whitening). On the near benchmark it is the first
    default that beats the plain model's per-split oracle on all three splits (it was 2 of 3), and it keeps
    the far sets the former default kept (the near models' 24 of 27; 8 of 9 on both 10-class check models,
    their blocks pooled without a grid). A standardized sum of the same two parts ties it on the proxies
    (0.6746) but loses split c; the joint weights were tried after a screen of block weights, and are taken
    for their principle and the proxies' (tied) verdict.
    """
    detection = classifier_layer(statistics) or "detection"
    components = default_components(tuple(statistics.layers), detection)
    blocks = [layer for layer, score in components if score == BLOCK_SCORE]
    if len(blocks) == 1 and conditioned_default(statistics, blocks[0], detection):
        return ((blocks[0], CONDITIONED_BLOCK_SCORE), (detection, DETECTION_SCORE)), "joint"
    return components, "sum"


def _registry():
    from . import COMPONENT_SCORES  # the package imports this module, so look the registry up late

    return COMPONENT_SCORES


def _component_detector(layer: str, score: str) -> Detector:
    from . import make_detector

    return make_detector(score) if layer == LOGITS else make_detector(score, layer=layer)


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
    duplicate, a logit-only score on a feature layer, no feature component, bad combine, a score that is
    no density under the "joint" combine)."""
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
    if combine == "joint":
        densities = sorted(name for name, cls in scores.items() if cls.log_density_scale is not None)
        for layer, score in pairs:
            if scores[score].log_density_scale is None:
                raise ConfigError(
                    f"fused component {layer}:{score}: the 'joint' combine adds negative log-densities and {score!r} is not one; "
                    f"use {', '.join(densities)}, or combine 'sum'"
                )
    return tuple(pairs)  # type: ignore[return-value]


def fused_components(statistics: StatisticsBundle, components=None, combine: str | None = None) -> tuple[tuple[tuple[str, str], ...], str]:
    """(validated components, combine) for these statistics: the given components ("block1:mahalanobis,..."
    or pairs; combine "sum" unless named), or `default_fused` (its combine unless one is named).
    ConfigError names what is wrong, including a layer the statistics do not hold."""
    if components is None or components == "":
        components, default_combine = default_fused(statistics)
        combine = combine or default_combine
    combine = combine or "sum"
    components = check_components(components, combine)
    for layer, score in components:
        if layer != LOGITS and layer not in statistics.layers:
            raise ConfigError(
                f"fused component {layer}:{score}: the statistics have no layer {layer!r}; they hold: {', '.join(statistics.layers)}"
            )
    return components, combine


class Fused(Detector):
    """s(x) = combine_l ( w_l (s_l(x) - mu_l) / sigma_l ), combine = "sum", "max" or "joint".

    An ordinary detector made of detectors. Each component l is (layer, base score name): s_l is
    that detector fitted on that layer's statistics (it gets the classifier only when the layer is
    the one the classifier acts on; logit-only scores are written "logits:energy"). mu_l and sigma_l
    are the mean and (population) standard deviation of s_l on held-out in-distribution data, which
    `fit` takes as its `held_out` mapping (`needs_held_out`): no OOD data is ever used. "sum" and
    "max" give the components equal weights, w_l = 1 (Lee et al. 2018 instead weight layers by a
    regressor fitted on OOD validation data). "joint" needs every component to be a Gaussian negative
    log-density (`log_density_scale` c_l: 1 for DDU, 1/2 for a squared Mahalanobis distance) and takes
    w_l = c_l sigma_l / mean_k(c_k sigma_k), so the sum is sum_l c_l s_l / mean_k(c_k sigma_k) plus a
    constant: the parts' negative log-densities added in their own units (-log of one density over their
    layers when each part is conditioned on exactly the layers the others score), in units that keep
    its held-out spread near that of "sum". `layers` is every layer a component reads, feature layers
    in component order, then "logits" if any reads them; `component_scores` are the weighted
    standardized parts, which is how the score explains a decision (an early block: the input looks
    different at the pixel level; the detection layer: it looks like no known class). `combine` None: the default's combine for default
    components (`default_fused`), else "sum"; the one used is `combine_`.
    """

    name = "fused"
    uses_features = True
    needs_held_out = True

    def __init__(self, components: Sequence[tuple[str, str]] | str | None = None, combine: str | None = None):
        """`components` None: `default_fused` of the statistics `fit` is given."""
        self.components = components
        self.combine = combine

    @property
    def uses_logits(self) -> bool:  # type: ignore[override]
        return LOGITS in self.layers

    @property
    def layers(self) -> tuple[str, ...]:
        if hasattr(self, "components_"):
            components = self.components_
        elif self.components is None:
            raise ConfigError(
                "the fused score's default components depend on the statistics' layers: fit it first, or build it "
                "with ncguard.scores.build_detector('fused', statistics)"
            )
        else:
            components = check_components(self.components, self.combine or "sum")
        detectors = getattr(self, "detectors_", None) or [_component_detector(layer, score) for layer, score in components]
        reads = [layer for detector in detectors for layer in detector.layers]  # a component may read several layers
        return tuple(dict.fromkeys(layer for layer in reads if layer != LOGITS)) + ((LOGITS,) if LOGITS in reads else ())

    def fit(self, statistics, held_out: Mapping[str, np.ndarray] | None = None) -> "Fused":
        """Fit every component on its layer's statistics, then mu_l, sigma_l on the held-out ID features."""
        bundle = _as_bundle(statistics)
        components, combine = fused_components(bundle, self.components, self.combine)
        detectors = []
        for layer, score in components:
            try:
                detectors.append(_component_detector(layer, score).fit(bundle))
            except ConfigError as exc:
                raise ConfigError(f"fused component {layer}:{score} cannot be fitted: {exc}") from exc
        if held_out is None:
            raise ConfigError(
                "the 'fused' score standardizes its components on held-out ID data: "
                "fit(statistics, held_out={layer: features, 'logits': logits})"
            )
        self.components_ = components
        self.detectors_ = detectors
        raw = self._raw(held_out, None, "held-out ID features")
        if raw.shape[0] < 2:
            raise DataError(f"fused needs at least 2 held-out ID rows to standardize its components, got {raw.shape[0]}")
        mu, sigma = raw.mean(axis=0), raw.std(axis=0)
        flat = ~(sigma > 0) | ~np.isfinite(sigma)
        if np.any(flat):
            names = ", ".join(f"{layer}:{score}" for (layer, score), bad in zip(components, flat) if bad)
            raise DataError(f"fused component(s) {names} score every held-out ID input the same (sigma 0): they cannot be standardized")
        self.mu_ = mu
        self.sigma_ = sigma
        self.combine_ = combine
        self.weights_ = np.ones_like(sigma)
        if combine == "joint":
            spread = np.array([detector.log_density_scale for detector in detectors], dtype=np.float64) * sigma
            self.weights_ = spread / spread.mean()
        self.fitted_ = True
        return self

    # ------------------------------------------------------------------ scoring

    def _raw(self, features, logits, what: str = "features") -> np.ndarray:
        """[N, K] each component's own score, before standardization."""
        if features is not None and not isinstance(features, Mapping):
            raise DataError("the fused score reads several layers: give its features as {layer: features}")
        layers = self._mapping(features, logits)
        missing = [layer for layer in self.layers if layer not in layers]
        if missing:
            raise DataError(f"the fused score needs the {what} of layer(s) {', '.join(map(repr, missing))}; got {', '.join(layers) or 'none'}")
        columns = [detector.score(layers) for detector in self.detectors_]
        rows = {len(column) for column in columns}
        if len(rows) > 1:
            raise DataError(f"the fused score's layers hold different numbers of rows: {sorted(rows)}")
        return np.stack(columns, axis=1)

    def component_names(self) -> list[str]:
        self._require_fitted()
        return [f"{layer}:{score}" for layer, score in self.components_]

    def component_scores(self, features=None, logits: np.ndarray | None = None) -> np.ndarray:
        """The weighted standardized components [N, K], w_l (s_l - mu_l) / sigma_l, before they are combined."""
        self._require_fitted()
        return (self._raw(features, logits) - self.mu_) / self.sigma_ * self.weights_

    def score(self, features=None, logits: np.ndarray | None = None) -> np.ndarray:
        parts = self.component_scores(features, logits)
        return parts.max(axis=1) if self.combine_ == "max" else parts.sum(axis=1)

    # ------------------------------------------------------------------ ONNX

    def build_graph(self, builder, inputs: Mapping[str, str], scale: float = 1.0, offset: float = 0.0, column: bool = False) -> str:
        """scale * the combined score - offset, [N] or [N, 1] (see `build_component_graph`, which also gives the parts)."""
        score, _ = self.build_component_graph(builder, inputs, scale, column=column)
        return builder.node("Sub", [score, builder.constant("fused_offset", offset)], "fused_shifted") if offset else score

    def build_component_graph(self, builder, inputs: Mapping[str, str], scale: float = 1.0, column: bool = False) -> tuple[str, str]:
        """Each component with its own builder, weighted and standardized as w (s - mu) / sigma, as the columns
        of one [N, K] tensor, then combined: (score [N] (or [N, 1] with `column`), components [N, K]).

        The standardization and the columns cost no node of their own: each component gets w_l / sigma_l
        as its graph's `scale` and w_l mu_l / sigma_l as its `offset`, and ends in a reduction that keeps
        its axis (Mahalanobis and low-rank DDU fold all three into constants and reductions they have
        anyway; see `Detector.build_graph`). One Concat stacks them and "sum" or "max" is one more
        reduction.
        """
        self._require_fitted()
        self._require_inputs(inputs)
        mu, sigma = np.asarray(self.mu_, dtype=np.float64), np.asarray(self.sigma_, dtype=np.float64)
        weights = np.asarray(self.weights_, dtype=np.float64)
        parts = [
            detector.build_graph(builder, inputs, scale=scale * float(w) / float(s), offset=scale * float(w) * float(m) / float(s), column=True)
            for detector, m, s, w in zip(self.detectors_, mu, sigma, weights)
        ]
        components = builder.node("Concat", parts, "ood_components", axis=1) if len(parts) > 1 else parts[0]
        reduce = "ReduceMax" if self.combine_ == "max" else "ReduceSum"
        return builder.reduce(reduce, components, 1, keepdims=column, hint="fused"), components

    def params(self) -> dict[str, np.ndarray]:
        """The numeric learned arrays (mu_, sigma_, weights_); the components' own live in `detectors_`."""
        return {"mu_": np.asarray(self.mu_), "sigma_": np.asarray(self.sigma_), "weights_": np.asarray(self.weights_)}

    def describe(self) -> dict:
        """JSON-ready record of the fitted score (for model metadata)."""
        self._require_fitted()
        return {
            "combine": self.combine_,
            "components": [
                {"layer": layer, "score": score, "mu": float(mu), "sigma": float(sigma), "weight": float(weight)}
                for (layer, score), mu, sigma, weight in zip(self.components_, self.mu_, self.sigma_, self.weights_)
            ],
            "layers": [layer for layer in self.layers if layer != LOGITS],
        }
