"""Training losses: label-smoothed cross-entropy + alpha * nearest-neighbour entropy on h, or the NC loss.

DESIGN.md section 1. The NC terms here are differentiable torch versions of the NC1-NC3
metrics whose reference implementation is NumPy (ncguard.collapse); they exist because
gradients need torch, and tests check they agree with the reference on the same features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ncguard.errors import ConfigError

LOSSES = ("ce", "nc")
LABEL_SMOOTHING = 0.1
ENTROPY_EPS = 1e-8


def entropy_regularizer(h: torch.Tensor) -> torch.Tensor:
    """L_ent = -(1/B) sum_i log(||u_i - u_j(i)|| + 1e-8), u = h/||h||, j(i) = argmax_{j != i} u_i . u_j.

    Minimizing it pushes every feature away from its nearest neighbour on the sphere: a
    Kozachenko-Leonenko entropy estimate that keeps the transfer features spread (weak collapse).
    """
    if h.ndim != 2 or h.shape[0] < 2:
        raise ConfigError(f"the entropy regularizer needs a batch of at least 2 feature vectors, got shape {tuple(h.shape)}")
    unit = F.normalize(h, dim=1)
    similarity = unit @ unit.T
    self_mask = torch.eye(h.shape[0], dtype=torch.bool, device=h.device)
    nearest = similarity.masked_fill(self_mask, float("-inf")).argmax(dim=1)
    distance = torch.linalg.vector_norm(unit - unit[nearest], dim=1)
    return -torch.log(distance + ENTROPY_EPS).mean()


def _class_moments(features: torch.Tensor, labels: torch.Tensor):
    """(present class ids, counts [K], class means [K, d], sample global mean [d], residuals x_i - mu_{y_i})."""
    present, inverse = torch.unique(labels, return_inverse=True)
    counts = torch.bincount(inverse, minlength=present.numel()).to(features.dtype)
    sums = torch.zeros(present.numel(), features.shape[1], dtype=features.dtype, device=features.device)
    means = sums.index_add(0, inverse, features) / counts[:, None]
    return present, counts, means, features.mean(dim=0), features - means[inverse]


def _nc1(centered: torch.Tensor, counts: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """tr(Sigma_W Sigma_B^+) / K without a pseudo-inverse (whose gradient breaks at rank changes).

    With the sample-weighted global mean, sum_k n_k m_k = 0, so M = T B with B the first K-1
    centered means and T = [I; -n_{<K}^T / n_K]. For B of full row rank,
    (B^T T^T T B)^+ = B^+ (T^T T)^-1 B^+T, hence tr(Sigma_W Sigma_B^+)/K = mean_i q_i^T S^-1 q_i
    with q_i = (B B^T)^-1 B (x_i - mu_{y_i}) and S = T^T T = I + n n^T / n_K^2: two small
    (K-1) x (K-1) solves, exact up to round-off.
    """
    basis, tail = centered[:-1], counts[:-1] / counts[-1]
    projected = torch.linalg.solve(basis @ basis.T, basis @ residuals.T)  # [K-1, N]
    shape = torch.eye(len(tail), dtype=centered.dtype, device=centered.device) + torch.outer(tail, tail)
    return (projected * torch.linalg.solve(shape, projected)).sum(dim=0).mean()


def _angle_terms(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(std of pairwise cosines, mean |cos + 1/(K-1)|) over distinct pairs of rows."""
    unit = F.normalize(vectors, dim=1)
    rows, cols = torch.triu_indices(vectors.shape[0], vectors.shape[0], offset=1, device=vectors.device)
    cosines = (unit @ unit.T)[rows, cols]
    return cosines.std(correction=0), (cosines + 1.0 / (vectors.shape[0] - 1)).abs().mean()


def _equinorm(vectors: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(vectors, dim=1)
    return norms.std(correction=0) / norms.mean()


def nc_terms(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Differentiable NC1, NC2 terms and NC3 of one batch, over the classes present in it.

    NC1 as in `_nc1`; the NC2 and NC3 terms follow ncguard.collapse key by key.
    """
    present, counts, means, global_mean, residuals = _class_moments(features, labels)
    if present.numel() < 2:
        raise ConfigError("the NC loss needs at least 2 classes in every batch: increase --batch-size")
    centered = means - global_mean
    nc1 = _nc1(centered, counts, residuals)

    weight_present = weight[present]
    means_std, means_dev = _angle_terms(centered)
    weights_std, weights_dev = _angle_terms(weight_present)
    direction_gap = weight_present / torch.linalg.matrix_norm(weight_present) - centered / torch.linalg.matrix_norm(centered)
    return {
        "nc1": nc1,
        "equinorm_means": _equinorm(centered),
        "equinorm_weights": _equinorm(weight_present),
        "equiangular_means_std": means_std,
        "equiangular_means_max_dev": means_dev,
        "equiangular_weights_std": weights_std,
        "equiangular_weights_max_dev": weights_dev,
        "nc3": direction_gap.pow(2).sum(),
    }


class TrainingLoss:
    """loss(output, labels, classifier_weight) -> (total, {part: float}) for the chosen objective.

    `ce`: CE with label smoothing 0.1 on the logits; `nc`: the sum of nc_terms on the detection
    features z (Haas et al.'s intervention). Both add entropy_weight * L_ent(h) when > 0.
    """

    def __init__(self, kind: str = "ce", entropy_weight: float = 0.05, label_smoothing: float = LABEL_SMOOTHING):
        if kind not in LOSSES:
            raise ConfigError(f"unknown loss {kind!r}: choose one of {', '.join(LOSSES)}")
        if not entropy_weight >= 0.0:
            raise ConfigError(f"entropy weight must be >= 0, got {entropy_weight}")
        self.kind = kind
        self.entropy_weight = float(entropy_weight)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, output, labels: torch.Tensor, classifier_weight: torch.Tensor):
        parts = {}
        if self.kind == "ce":
            total = F.cross_entropy(output.logits, labels, label_smoothing=self.label_smoothing)
            parts["ce"] = total.detach()
        else:
            terms = nc_terms(output.detection, labels, classifier_weight)
            total = sum(terms.values())
            parts.update({name: value.detach() for name, value in terms.items()})
        if self.entropy_weight > 0.0:
            entropy = entropy_regularizer(output.transfer)
            total = total + self.entropy_weight * entropy
            parts["entropy"] = entropy.detach()
        return total, {name: float(value) for name, value in parts.items()}
