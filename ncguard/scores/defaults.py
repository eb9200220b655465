"""The one place that decides which OOD score a model gets when nobody names one.

Keyed by the detection head a run was trained with (`ncguard train --head`), plus `FOREIGN` for a
classifier ncguard did not train (`ncguard fit`, bring your own model). `ncguard train` records
the choice in the run (config.json `settings.score`, with `settings.tpr`), `ncguard export` reads
both back from the run, and `ncguard fit` asks here; the TPR default is
`ncguard.calibration.DEFAULT_TPR`, the threshold's own module.

Why each entry:
- etf, plain -> "fused": the quality benchmark's winner on both heads (benchmarks/results/quality.md,
  check/ and near/; its components, its combine and why: `ncguard.scores.fused.default_fused`): on
  Fashion-MNIST it beats the best standard score of the plain model on 8 of 9 far-OOD sets, and it is
  the best of the ID-only candidates on near OOD.
- l2 -> "ddu": Haas et al.'s L2-normalized model is scored with DDU's density in their paper, and the
  `l2` head exists to reproduce it.
- foreign -> "knn" (Sun et al. 2022, deep nearest neighbours): the most reliable post-hoc score we
  measured on plain cross-entropy CNNs wrapped by `ncguard fit`. Fashion-MNIST (small CNN, 3 epochs,
  89.6%): mean AUROC 0.986 over uniform and Gaussian noise, inverted images and upscaled digits, never
  below 0.97 (etf 0.971, ddu 0.946, vim 0.937, mahalanobis 0.906; energy, maxlogit, nci and neco do
  best on digits, 0.987-0.997, but miss noise, <= 0.80). Digits (tiny CNN, 3 seeds; noise, inverted
  digits, 4 classes held out of training): knn 0.989, ddu 0.991, vim 0.966. Unlike ddu it needs no
  per-class covariance (C x D x D floats in memory and in the graph), so it scales to many classes.
- foreign-multi -> "fused": given blocks as well as the penultimate layer, the foreign model gets
  block statistics (every block named) beside the class-level score; it beats single-tensor knn on
  every set of the check run (benchmarks/results/check/quality.md, bring-your-own rows).
"""

from __future__ import annotations

from ..errors import ConfigError

FOREIGN = "foreign"  # a classifier ncguard did not train (ncguard fit), read at one tensor
FOREIGN_MULTI = "foreign-multi"  # the same, read at several tensors (ncguard fit --features A,B,C)

DEFAULT_SCORES = {"etf": "fused", "plain": "fused", "l2": "ddu", FOREIGN: "knn", FOREIGN_MULTI: "fused"}


def default_score(head: str | None) -> str:
    """The score for a model with detection head `head` (None: a run too old to record it, an etf run)."""
    key = "etf" if head is None else head
    if key not in DEFAULT_SCORES:
        raise ConfigError(f"no default score for head {head!r}; known: {', '.join(DEFAULT_SCORES)}")
    return DEFAULT_SCORES[key]
