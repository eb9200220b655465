"""Virtual-logit matching (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR 2022)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from ..stats import pinv_rtol
from .base import Detector, check_classifier
from .energy import energy


def classifier_origin(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """u = -W^+ b, with singular values of W below `stats.pinv_rtol(max(C, D))` of the largest cut.

    The cut-off is the one the project uses for covariances (NumPy's `matrix_rank` tolerance),
    not `np.linalg.pinv`'s default 1e-15. A head whose rows sum to zero (multinomial logistic
    regression, centred heads, many bring-your-own models) has rank C - 1: its smallest singular
    value is round-off (~1e-15 of the largest), just above the default cut-off, and inverting it
    turns the bias's component along 1 (which only shifts every logit by the same amount and so
    changes no softmax) into a huge origin. Measured on a 10-class, 64-wide scikit-learn
    multinomial head: ||u|| was 0.26 with the default cut-off and 2356 after adding 1e-12 to b;
    with this one it is 0.042 both times (the issue's pytorch-ood cross-check: 13.8 -> 316).
    """
    return -np.linalg.pinv(weight, rtol=pinv_rtol(max(weight.shape))) @ bias


def principal_dim(width: int) -> int:
    """The paper's width rule for the principal subspace: 1000 if D >= 2048, 512 if D >= 768, else D/2."""
    if width >= 2048:
        return 1000
    if width >= 768:
        return 512
    return width // 2


class ViM(Detector):
    """score = alpha * ||(h - u)^{P-perp}|| - logsumexp(logits): energy plus the virtual logit.

    - origin u = -W^+ b, so that the logits are linear (not affine) in h - u; W^+ cuts singular
      values at the project's covariance rule (`classifier_origin`), so a zero-sum head's
      round-off singular value is not inverted;
    - the principal subspace P is spanned by the top `n_principal` eigenvectors of
      E[(h - u)(h - u)^T] (from the statistics' mean and second moment, i.e. over all ID
      training features); the residual (h - u)^{P-perp} is the projection on the rest;
    - n_principal follows the paper's width rule (`principal_dim`): 1000 for D >= 2048,
      512 for D >= 768, otherwise D // 2;
    - alpha = mean max-logit / mean residual norm on the statistics' bank, so the virtual
      logit has the scale of a real one (the paper computes both means on training data).

    The paper's ID score is logsumexp(logits, virtual logit) ~ -alpha ||res|| + logsumexp(logits);
    this returns its negation so that higher = more OOD.
    """

    name = "vim"
    uses_features = True
    uses_logits = True

    def __init__(self, n_principal: int | None = None, layer: str | None = None) -> None:
        self.n_principal = n_principal
        self.layer = layer

    def _fit(self, stats, weight, bias):
        n_classes, width = stats.means_.shape
        weight, bias = check_classifier(weight, bias, n_classes, width, self.name)
        n_principal = principal_dim(width) if self.n_principal is None else self.n_principal
        if not isinstance(n_principal, (int, np.integer)) or not 1 <= n_principal < width:
            raise ConfigError(
                f"vim needs 1 <= n_principal < feature width {width} to leave a residual, got {n_principal!r}"
            )
        if stats.bank_.shape[0] == 0:
            raise DataError("the vim score needs a feature bank to set alpha; fit the statistics with bank_size > 0")
        origin = classifier_origin(weight, bias)
        mean = stats.global_mean_
        moment = stats.second_moment_ - np.outer(origin, mean) - np.outer(mean, origin) + np.outer(origin, origin)
        _, eigenvectors = np.linalg.eigh((moment + moment.T) / 2)  # ascending eigenvalues
        residual_basis = eigenvectors[:, : width - n_principal]
        bank_residual = np.linalg.norm((stats.bank_ - origin) @ residual_basis, axis=1).mean()
        bank_max_logit = (stats.bank_ @ weight.T + bias).max(axis=1).mean()
        if not bank_residual > 0:
            raise DataError("vim: the bank's features have no residual outside the principal subspace, alpha is undefined")
        if not bank_max_logit > 0:
            raise DataError(
                f"vim: the mean max-logit on the bank is {bank_max_logit:.3g}, not positive, so alpha "
                "(mean max-logit / mean residual) cannot scale the virtual logit"
            )
        self.origin_ = origin
        self.residual_basis_ = residual_basis
        self.alpha_ = float(bank_max_logit / bank_residual)
        self.n_classes_ = n_classes

    def _feature_width(self):
        return self.origin_.shape[0]

    def _logit_width(self):
        return self.n_classes_

    def _score(self, features, logits):
        residual = np.linalg.norm((features - self.origin_) @ self.residual_basis_, axis=1)
        return self.alpha_ * residual + energy(logits)

    def _graph(self, b, features, logits):
        centred = b.node("Sub", [features, b.constant("origin", self.origin_)], "centred")
        residual = b.reduce("ReduceL2", b.node("MatMul", [centred, b.constant("residual_basis", self.residual_basis_)]), 1, hint="residual")
        virtual = b.node("Mul", [residual, b.constant("alpha", self.alpha_)], "virtual_logit")
        return b.node("Sub", [virtual, b.logsumexp(logits)], "vim")
