"""Energy score (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Detector, logsumexp


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """E(x) = -T * logsumexp(logits / T): the free energy; in-distribution inputs have lower energy."""
    return -temperature * logsumexp(logits / temperature)


class Energy(Detector):
    """score = -T * log sum_c exp(f_c / T), with T = 1 by default as in the paper's post-hoc use.

    Higher energy = more OOD. Needs no fitting; `temperature` is a hyperparameter, not learned,
    so the exporter reads it from the attribute rather than from `params()`.
    """

    name = "energy"
    uses_logits = True
    needs_fit = False

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _score(self, features, logits):
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"energy temperature must be a positive number, got {self.temperature!r}")
        return energy(logits, float(self.temperature))

    def _graph(self, b, features, logits):
        temperature = float(self.temperature)
        if not np.isfinite(temperature) or temperature <= 0:
            raise ConfigError(f"energy temperature must be a positive number, got {self.temperature!r}")
        scaled = b.node("Div", [logits, b.constant("temperature", temperature)], "scaled_logits")
        return b.node("Mul", [b.logsumexp(scaled), b.constant("minus_temperature", -temperature)], "energy")
