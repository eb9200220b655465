"""Low-rank Gaussian discriminant density: DDU (Mukhoti, Kirsch, van Amersfoort, Torr & Gal, "Deep
Deterministic Uncertainty: A New Simple Baseline", CVPR 2023) with each class covariance modelled as
in a mixture of probabilistic PCA (Tipping & Bishop, "Mixtures of Probabilistic Principal Component
Analyzers", Neural Computation 1999), the principal subspace shared by all classes."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Detector, logsumexp
from .ddu import EIGENVALUE_FLOOR, lift_small_eigenvalues, mixture_log_weights, smallest_jitter_cholesky

DEFAULT_RANK = 64


class LowRankDDU(Detector):
    """score = -log sum_c pi_c N(v; mu_c, B S_c B^T + s_c (I - B B^T)).

    B [D, r] holds the top-r eigenvectors of the pooled within-class covariance, S_c = B^T Sigma_c B
    is class c's covariance inside that subspace (eigenvalues below DDU's `EIGENVALUE_FLOOR` of the
    largest lifted, then DDU's jitter ladder), and s_c = (tr Sigma_c - tr S_c) / (D - r) its mean
    variance outside it, at least `EIGENVALUE_FLOOR` times the largest pooled variance. With
    p = B^T (v - mu_c) and L_c L_c^T = S_c:
        log N_c = -(D log 2 pi + 2 sum log diag L_c + (D - r) log s_c
                    + ||L_c^-1 p||^2 + (||v - mu_c||^2 - ||p||^2) / s_c) / 2,
    summed over classes with logsumexp. `rank` >= D is DDU itself (no residual term).

    Why (issue 16), against full-covariance `ddu`:
    - cost: the exported graph projects v once onto B and whitens C small r x r blocks, instead of C
      full D x D whitenings (10 x 256 x 256 floats, which ONNX Runtime streams from memory on every
      call: the largest node of the default graph at batch 1 and 64);
    - quality, judged ID-only: on the 9 proxy models that hold out known classes
      (benchmarks/quality/select.py), block3 Mahalanobis plus this score at r = 64 averages an
      objective of 0.667 against 0.642 with full DDU, and beats it on 8 of 9 proxies. A full
      covariance in 256 dimensions from a few thousand samples per class trusts its smallest
      eigenvalues, which are mostly estimation noise; the isotropic residual keeps every direction
      outside B at one honest, class-wide variance instead.
    Measured numbers: benchmarks/results/near/README.md.
    """

    name = "ddu-lowrank"
    log_density_scale = 1.0  # score = -log p(v) itself
    uses_features = True
    needs_class_covariances = True

    def __init__(self, rank: int = DEFAULT_RANK, layer: str | None = None) -> None:
        self.rank = rank
        self.layer = layer

    def _fit(self, stats, weight, bias):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ConfigError(f"ddu-lowrank rank must be a whole number >= 1, got {self.rank!r}")
        if not hasattr(stats, "class_covariances_"):
            raise ConfigError("the 'ddu-lowrank' score needs per-class covariances: fit the statistics with per_class_covariance=True")
        n_classes, width = stats.means_.shape
        rank = min(int(self.rank), width)
        values, vectors = np.linalg.eigh((stats.covariance_ + stats.covariance_.T) / 2)
        self.basis_ = vectors[:, ::-1][:, :rank].copy()
        floor = EIGENVALUE_FLOOR * max(float(values.max(initial=0.0)), np.finfo(np.float64).tiny)
        self.means_ = stats.means_.copy()
        self.whitening_ = np.empty((n_classes, rank, rank))
        self.residual_variances_ = np.ones(n_classes)
        log_det = np.empty(n_classes)
        for c, covariance in enumerate(stats.class_covariances_):
            inside = self.basis_.T @ covariance @ self.basis_
            _, cholesky = smallest_jitter_cholesky(lift_small_eigenvalues((inside + inside.T) / 2))
            self.whitening_[c] = np.linalg.inv(cholesky)
            log_det[c] = 2.0 * np.log(np.diag(cholesky)).sum()
            if rank < width:
                self.residual_variances_[c] = max((np.trace(covariance) - np.trace(inside)) / (width - rank), floor)
                log_det[c] += (width - rank) * np.log(self.residual_variances_[c])
        # 1 / s_c, or 0 when B spans everything (rank = D: the residual is zero, DDU exactly)
        self.residual_precisions_ = 1.0 / self.residual_variances_ if rank < width else np.zeros(n_classes)
        self.log_weights_ = mixture_log_weights(stats.counts_, width, log_det)

    def _feature_width(self):
        return self.means_.shape[1]

    def _score(self, features, logits):
        log_joint = np.empty((features.shape[0], self.means_.shape[0]))
        for c, mean in enumerate(self.means_):
            diff = features - mean
            inside = diff @ self.basis_
            residual = np.maximum((diff**2).sum(axis=1) - (inside**2).sum(axis=1), 0.0)
            whitened = inside @ self.whitening_[c].T
            log_joint[:, c] = self.log_weights_[c] - 0.5 * ((whitened**2).sum(axis=1) + self.residual_precisions_[c] * residual)
        return -logsumexp(log_joint)

    def _graph(self, b, features, logits):
        return self._affine_graph(b, features, logits, 1.0, 0.0, False)

    def _affine_graph(self, b, features, logits, scale, offset, column):
        # scale * -logsumexp_c(log_joint_c) - offset in 13 nodes, nothing of size [C, N, D] or [C, N, r]
        # formed, so the cost stays near one [N, D] x [D, r] product. Centred on the mean of the class means
        # first (v' = v - m, mu'_c = mu_c - m), so the expanded squares below add numbers of the data's spread,
        # not of its offset. With p = v' B, k_c = 1 / (2 s_c) and rho_c = (I - B B^T) mu'_c (the part of a
        # class mean outside the subspace), the residual ||v' - mu'_c||^2 - ||B^T (v' - mu'_c)||^2 is
        # t - 2 v'.rho_c + ||rho_c||^2 with t = ||v'||^2 - ||p||^2 the same for every class, so
        #   log_joint_c = lin_c - k_c t - ||sqrt(1/2) (p - mu'_c B) L_c^-T||^2,
        #   lin_c = log w_c - k_c ||rho_c||^2 + 2 k_c rho_c . v'   (one Gemm for all classes),
        # the whitening of every class is one Gemm ([N, r] x [r, C r], the class means in its bias) read as
        # [N, C, r], and k_c t joins lin_c in a Gemm of rank one. The offset goes into lin_c's bias
        # (-scale lse(x) - offset = -scale lse(x + offset / scale)) and the final Neg and the scale are one
        # Mul. t is a difference of squares, like the NumPy formula's residual; in float32 its error is about
        # 1e-7 x ||v'||^2 / s_c, far below the score's own spread (parity tests). Every node counts at batch 1
        # (a few microseconds each, whatever it computes), hence the folding.
        if scale == 0:
            return super()._affine_graph(b, features, logits, scale, offset, column)
        n_classes, rank = self.means_.shape[0], self.basis_.shape[1]
        centre = self.means_.mean(axis=0)
        means = self.means_ - centre
        k = 0.5 * self.residual_precisions_
        projected_means = means @ self.basis_  # [C, r]
        outside = means - projected_means @ self.basis_.T  # rho_c [C, D]
        half_whitening_t = np.sqrt(0.5) * np.transpose(self.whitening_, (0, 2, 1))  # [C, r, r]
        whitening = np.concatenate(list(half_whitening_t), axis=1)  # [r, C r]: class c in columns c r .. (c + 1) r - 1
        whitened_means = np.einsum("cr,crs->cs", projected_means, half_whitening_t).reshape(-1)
        lin_offsets = self.log_weights_ - k * (outside**2).sum(axis=1) + offset / scale

        centred = b.node("Sub", [features, b.constant("centre", centre[None, :])], "centred")
        projected = b.node("MatMul", [centred, b.constant("basis", self.basis_)], "projected")  # [N, r]
        whitened = b.node("Gemm", [projected, b.constant("half_whitening", whitening), b.constant("whitened_means", -whitened_means)], "whitened")
        by_class = b.node("Reshape", [whitened, b.constant("by_class_shape", [0, n_classes, rank], np.int64)], "whitened_by_class")
        whitened_sq = b.reduce("ReduceSumSquare", by_class, 2, hint="whitened_sq")  # [N, C]
        residual = b.node("Sub", [b.reduce("ReduceSumSquare", centred, 1, keepdims=True, hint="norm_sq"),
                                  b.reduce("ReduceSumSquare", projected, 1, keepdims=True, hint="projected_sq")], "residual")  # t [N, 1]
        lin = b.node("Gemm", [centred, b.constant("outside_t", (2.0 * k[:, None] * outside).T), b.constant("lin_offsets", lin_offsets)], "lin")
        lin_minus_residual = b.node("Gemm", [residual, b.constant("minus_k", -k[None, :]), lin], "lin_minus_residual")  # [N, C]
        log_joint = b.node("Sub", [lin_minus_residual, whitened_sq], "log_joint")
        log_density = b.reduce("ReduceLogSumExp", log_joint, 1, keepdims=column, hint="log_density")
        return b.node("Mul", [log_density, b.constant("ddu_lowrank_scale", -float(scale))], "ddu_lowrank_scaled")
