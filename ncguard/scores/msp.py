"""Maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017)."""

from __future__ import annotations

import numpy as np

from .base import Detector, logsumexp


class MSP(Detector):
    """score = -max_c softmax(f)_c = -exp(max_c f_c - logsumexp(f)). Needs no fitting."""

    name = "msp"
    uses_logits = True
    needs_fit = False

    def _score(self, features, logits):
        return -np.exp(logits.max(axis=1) - logsumexp(logits))

    def _graph(self, b, features, logits):
        top = b.reduce("ReduceMax", logits, 1, hint="max_logit")
        return b.neg(b.node("Exp", [b.node("Sub", [top, b.logsumexp(logits)])], "max_probability"))
