"""Does the ONNX graph compute what the reference computes? Checked at export time and in the tests.

Torch-free: the caller supplies the reference values (torch logits, NumPy scores in float64) and
the graph's outputs (ONNX Runtime, float32).

Tolerance. The graph works in float32 (unit round-off u = 2^-24 ~ 6e-8) where the reference works
in float64. A score is a short chain of dot products over at most a few thousand features, so its
float32 error is a few sqrt(D) u ~ 1e-5 of the magnitudes involved, and those magnitudes can exceed
the score itself when terms cancel (ViM subtracts a logsumexp from a residual, Mahalanobis and DDU
are differences of whitened vectors). At export time the graph's features also differ from torch's
by a few u (another convolution kernel). So a score passes when

    |graph - reference| <= SCORE_RTOL * (|reference| + spread),

spread being the reference scores' standard deviation over the checked batch: 1e-3 is about 100x
the float32 error measured on every score (tests/test_export_score_graph.py), while a wrong formula,
parameter or layer moves scores by a sizeable fraction of their spread. Two scores end in a square
root of a difference of unit-vector products, sqrt(2 - 2 cos), which turns an error e in the
cosine into up to sqrt(2 e) near zero distance; for them (`SQRT_SCORES`) the allowance adds
sqrt(2 * 4 sqrt(D) u). Labels must agree wherever the reference's top two logits are further apart
than the logit tolerance (a closer call can legitimately flip in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncguard.errors import ModelError

FLOAT32_ROUNDOFF = 2.0**-24
SCORE_RTOL = 1e-3
SQRT_SCORES = frozenset({"knn"})


@dataclass(frozen=True)
class ParityResult:
    what: str
    n: int
    max_abs_error: float
    worst_ratio: float  # max over samples of error / allowed error; <= 1 passes

    def describe(self) -> str:
        return f"{self.what}: {self.n} inputs, max |error| {self.max_abs_error:.3g} ({self.worst_ratio:.2%} of the tolerance)"


def allowed_error(reference: np.ndarray, *, sqrt_of_cosine: bool = False, width: int | None = None) -> np.ndarray:
    """Per-sample tolerance for a float32 graph against a float64 reference (module docstring)."""
    reference = np.asarray(reference, dtype=np.float64)
    spread = float(reference.std()) if reference.size > 1 else 0.0
    allowed = SCORE_RTOL * (np.abs(reference) + spread)
    if sqrt_of_cosine:
        if not width:
            raise ValueError("sqrt_of_cosine needs the feature width")
        allowed = allowed + np.sqrt(2.0 * 4.0 * np.sqrt(width) * FLOAT32_ROUNDOFF)
    return np.maximum(allowed, np.finfo(np.float32).tiny)


def compare(what: str, reference, candidate, *, sqrt_of_cosine: bool = False, width: int | None = None) -> ParityResult:
    """Measure `candidate` against `reference`; ModelError if a shape differs or a value is off."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ModelError(f"parity check failed for {what}: shape {candidate.shape} from the graph, {reference.shape} expected")
    if not np.all(np.isfinite(candidate)):
        raise ModelError(f"parity check failed for {what}: the graph produced NaN or infinite values")
    error = np.abs(candidate - reference)
    ratio = error / allowed_error(reference, sqrt_of_cosine=sqrt_of_cosine, width=width)
    result = ParityResult(what, int(reference.shape[0]) if reference.ndim else 1, float(error.max(initial=0.0)), float(ratio.max(initial=0.0)))
    if result.worst_ratio > 1.0:
        worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        raise ModelError(
            f"parity check failed for {what}: the ONNX graph gives {candidate[worst]:.6g} where the reference gives "
            f"{reference[worst]:.6g} (input {worst[0]}); {int((ratio > 1).sum())} of {ratio.size} values are outside "
            f"the float32 tolerance. The exported graph does not compute what was trained; do not ship it"
        )
    return result


def compare_scores(name: str, reference, candidate, width: int | None = None) -> ParityResult:
    """An OOD score from the graph against the NumPy reference detector's."""
    return compare(f"the {name!r} OOD score", reference, candidate, sqrt_of_cosine=name in SQRT_SCORES, width=width)


def compare_logits(reference, candidate) -> ParityResult:
    """Logits within tolerance, and the same label wherever the top two logits are not a near tie."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    result = compare("the logits", reference, candidate)
    if reference.ndim == 2 and reference.shape[1] > 1:
        top_two = np.sort(reference, axis=1)[:, -2:]
        decisive = (top_two[:, 1] - top_two[:, 0]) > 2 * allowed_error(reference).max(axis=1)
        differ = (reference.argmax(axis=1) != candidate.argmax(axis=1)) & decisive
        if differ.any():
            raise ModelError(
                f"parity check failed: the ONNX graph predicts another label than torch for {int(differ.sum())} of "
                f"{len(reference)} inputs (first: input {int(np.flatnonzero(differ)[0])})"
            )
    return result
