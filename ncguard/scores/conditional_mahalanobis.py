"""Mahalanobis distance of one layer's features given other layers' features (issue 16): how unusual
an input's block statistics are for an image whose head features look like this one's."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import ConfigError, DataError
from ..stats import StatisticsBundle, joint_features, joint_name, pinv_rtol
from .mahalanobis import DEFAULT_EIGENVALUE_FLOOR, Mahalanobis, floored_precision

HEAD_LAYERS = ("detection", "transfer")  # what a trained run's block statistics are conditioned on


def streamed_joint(layers) -> tuple[str, ...] | None:
    """The layers whose joint statistics `ncguard train` streams beside the per-layer ones: its last
    conv block (the one `fused` scores) followed by HEAD_LAYERS, or None when the run fits no block or
    not both head layers. One joint statistic (tied covariance only), because its cost grows with the
    square of its width: (256 + 256 + 256)^2 for the default cnn."""
    head = [layer for layer in HEAD_LAYERS if layer in layers]
    blocks = [layer for layer in layers if layer not in (*HEAD_LAYERS, "logits")]
    return (blocks[-1], *HEAD_LAYERS) if blocks and len(head) == len(HEAD_LAYERS) else None


class ConditionalMahalanobis(Mahalanobis):
    """score = min_c (r - rho_c)^T Sigma_r^-1 (r - rho_c), r = b - A^T f - a.

    b are the features of `layer` (a conv block's statistics), f those of the `given` layers
    concatenated; r is the residual of the least-squares regression of b on f (with intercept a),
    rho_c the classes' mean residuals and Sigma_r the residual's tied within-class covariance, its
    eigenvalues floored as `Mahalanobis` floors them. For Gaussian features this is -2 log p(b | f)
    up to a constant: the part of b that f does not explain.

    Why (issue 16, near OOD): a conv block's statistics move with what an image shows as well as with
    how its pixels look, so a block component summed with a semantic one (`fused`: Mahalanobis on
    block3 plus low-rank DDU on the detection layer) counts the class content twice, and on a near-OOD
    split whose unseen classes share the known classes' textures its class-driven variation is noise
    (split c: the block part alone scores the unseen classes at AUROC 0.68 and pulls the sum from
    0.87 to 0.82). Conditioned on the head, the sum reads as one joint density, -log p(b | f) -
    log p(f) (but for the head layers a semantic part does not score), when the parts are added in
    their own units (`fused --combine joint`, this score's `log_density_scale` 1/2 as Mahalanobis's).
    benchmarks/results/near/conditional_study.md: on the 9 ID-only proxy models the objective rises
    from 0.667 to 0.675 (block3 given detection and transfer, 8 of 9 proxies better) with the far-OOD
    sets kept; added as one density, it is the default for runs with enough training data
    (`ncguard.scores.fused.default_fused`). Lee et al. (2018) fit one Gaussian per layer and
    combine them as if independent; this is the conditional term of a Gaussian over both layers.

    Fitted from the bundle's joint statistics of [b, f] (`StatisticsBundle.joint`, the key
    `joint_name((layer, *given))`; `ncguard train` streams them for its last block given the detection
    and transfer layers): with T the total covariance (within-class plus between-class) and W the
    tied within-class covariance of [b, f], A = T_ff^+ T_fb and, with M = [I; -A],
    Sigma_r = M^T W M. Every quantity is exact from the streamed moments, nothing is refitted on
    rows. As a formula on the concatenated input v = [b, f], r - rho_c = (v - m_c) M with m_c the
    joint class means, so the score is the Mahalanobis score of v with precision M P M^T
    (P = Sigma_r^-1 floored): `means_` and `precision_` are those, and the ONNX graph is the
    Mahalanobis graph (five nodes, its whitening of rank dim b) after one Concat.

    It needs data: the regression has dim f + 1 coefficients per block feature (513 for the default
    cnn), fitted on the fit split. On scikit-learn's digits (1,212 fit rows) the fitted residual is
    too small for new inputs and the score loses noise it otherwise catches (uniform noise FPR95
    0.19 against 0.00 for the default `fused`; on Fashion-MNIST's 54,000 rows it keeps every far set).
    """

    name = "conditional-mahalanobis"
    needs_joint_statistics = True

    def __init__(self, given: tuple[str, ...] | list[str] = HEAD_LAYERS, eigenvalue_floor: float = DEFAULT_EIGENVALUE_FLOOR, layer: str | None = None) -> None:
        self.given = given
        self.eigenvalue_floor = eigenvalue_floor
        self.layer = layer

    def _given(self) -> tuple[str, ...]:
        given = (self.given,) if isinstance(self.given, str) else tuple(self.given)
        if not given or not all(isinstance(name, str) and name for name in given):
            raise ConfigError(f"conditional-mahalanobis needs the layer names it conditions on (given=...), got {self.given!r}")
        return given

    def _joint_name(self) -> str:
        layer = self._feature_layer()
        if layer in self._given():
            raise ConfigError(f"conditional-mahalanobis cannot condition layer {layer!r} on itself")
        return joint_name((layer, *self._given()))

    @property
    def layers(self) -> tuple[str, ...]:
        return (self._feature_layer(), *self._given())

    def _feature_layer(self) -> str:
        if self.layer is None and getattr(self, "layer_", None) is None:
            raise ConfigError("conditional-mahalanobis reads a conv block's statistics: name the layer (layer='block3')")
        return super()._feature_layer()

    def fit(self, statistics, held_out: Mapping[str, np.ndarray] | None = None) -> "ConditionalMahalanobis":
        if not isinstance(statistics, StatisticsBundle):
            raise ConfigError("conditional-mahalanobis is fitted on a StatisticsBundle with joint statistics (a trained run's)")
        key = self._joint_name()
        if key not in statistics.joint:
            held = ", ".join(statistics.joint) or "none"
            raise ConfigError(
                f"conditional-mahalanobis on {self._feature_layer()!r} given {', '.join(self._given())} needs the joint statistics "
                f"{key!r}, which these statistics do not hold (they hold: {held}); runs trained before they were streamed "
                f"can use 'mahalanobis'"
            )
        floor = self._checked_floor()
        stats = statistics.joint[key]
        width = statistics.layers[self._feature_layer()].means_.shape[1]
        within, total = stats.covariance_, stats.total_covariance_
        head = total[width:, width:]
        regression = np.linalg.pinv(head, rtol=pinv_rtol(head.shape[0]), hermitian=True) @ total[width:, :width]  # A [D_f, D_b]
        residual_map = np.concatenate([np.eye(width), -regression], axis=0)  # M [D_b + D_f, D_b]
        residual_precision = floored_precision(residual_map.T @ within @ residual_map, floor)
        self.means_ = stats.means_.copy()
        self.precision_ = residual_map @ residual_precision @ residual_map.T
        self.layer_ = self._feature_layer()
        self.fitted_ = True
        return self

    def _mapping(self, features, logits) -> dict:
        if not isinstance(features, Mapping):
            raise DataError(f"conditional-mahalanobis reads {', '.join(self.layers)}: give its features as {{layer: features}}")
        return super()._mapping(features, logits)

    def _feature_input(self, layers: Mapping[str, np.ndarray]) -> np.ndarray:
        return joint_features(layers, self._joint_name())

    def _graph_input(self, builder, inputs: Mapping[str, str]) -> str:
        return builder.node("Concat", [inputs[layer] for layer in self.layers], "conditioned_on", axis=1)
