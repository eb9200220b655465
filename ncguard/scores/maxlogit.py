"""Maximum logit (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
Settings", ICML 2022)."""

from __future__ import annotations

from .base import Detector


class MaxLogit(Detector):
    """score = -max_c f_c. Needs no fitting."""

    name = "maxlogit"
    uses_logits = True
    needs_fit = False

    def _score(self, features, logits):
        return -logits.max(axis=1)

    def _graph(self, b, features, logits):
        return b.neg(b.reduce("ReduceMax", logits, 1, hint="max_logit"))
