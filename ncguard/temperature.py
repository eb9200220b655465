"""Temperature scaling: one scalar T so that softmax(logits / T) is a calibrated confidence.

Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017: among the
post-hoc calibration methods they compare, a single temperature fitted by minimizing the negative
log-likelihood (NLL) on held-out ID data does as well as any, and it cannot change a prediction
(argmax(logits / T) = argmax(logits) for T > 0), so labels, logits and OOD scores stay as they are.
ncguard needs it because the ETF/L2 detection head's logits have a fixed scale: its softmax
confidence is far from its accuracy (issue 15: 0.67-0.76 confidence on digits the model gets 99.6%
right), and a user reading `confidence` is misled.

The fit is a bounded 1-D search written in NumPy, not `scipy.optimize.minimize_scalar` or torch's
L-BFGS (what pytorch-ood's TemperatureScaling uses): the core is torch-free and scipy is only a dev
dependency. It is also exact rather than approximate: with beta = 1 / T, NLL(beta) =
mean_i [logsumexp(beta l_i) - beta l_{i, y_i}] is convex in beta (logsumexp of an affine function
of beta, minus a linear term), hence unimodal in log beta, so a golden-section search on log T
over the bounds converges to the global minimum within the bounds.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import DataError

# Search bounds for T: 1/20 sharpens a softmax 20-fold, 20 flattens it 20-fold; a temperature at
# a bound means the logits carry (almost) no usable confidence, and the fit says so by returning it.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# Golden-section steps: each keeps 0.618 of the log-interval (log(400) ~ 6 wide), so 60 steps leave
# 6 * 0.618^60 ~ 2e-12 in log T, far below anything that changes a probability.
SEARCH_STEPS = 60
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _checked(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise DataError(f"logits must be [N, C] with N >= 1 and C >= 2, got shape {logits.shape}")
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be {logits.shape[0]} integer class indices, got shape {labels.shape} of {labels.dtype}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise DataError(f"labels must lie in 0..{logits.shape[1] - 1}")
    if not np.all(np.isfinite(logits)):
        raise DataError("logits contain NaN or infinite values")
    return logits, labels.astype(np.int64)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log softmax(logits / T), shifted by the row maximum so nothing overflows."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) per row, what the exported graph's `probabilities` computes."""
    return np.exp(log_softmax(logits, temperature))


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    logits, labels = _checked(logits, labels)
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T in `bounds` minimizing nll(logits, labels, T) (module docstring: golden section on log T).

    Held-out ID data only (never the data the network was trained on, whose logits are
    overconfident, and never OOD data).
    """
    logits, labels = _checked(logits, labels)
    low, high = (math.log(float(b)) for b in bounds)
    if not low < high:
        raise DataError(f"temperature bounds must be 0 < low < high, got {bounds}")
    true_logit = logits[np.arange(len(labels)), labels]

    def loss(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        top = scaled.max(axis=1)
        return float(np.mean(top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)) - true_logit / math.exp(log_t)))

    a, b = low, high
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    loss_c, loss_d = loss(c), loss(d)
    for _ in range(SEARCH_STEPS):
        if loss_c <= loss_d:  # the minimum lies in [a, d]
            b, d, loss_d = d, c, loss_c
            c = b - _GOLDEN * (b - a)
            loss_c = loss(c)
        else:  # in [c, b]
            a, c, loss_c = c, d, loss_d
            d = a + _GOLDEN * (b - a)
            loss_d = loss(d)
    candidates = {low: loss(low), high: loss(high), (a + b) / 2: loss((a + b) / 2)}
    return float(math.exp(min(candidates, key=candidates.get)))
