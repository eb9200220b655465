"""Running an exported model with ONNX Runtime: provider choice and batched prediction.

Shared by `ncguard predict`, `ncguard evaluate` and the service, so every path scores inputs
the same way. Torch-free.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, DataError, ModelError
from .model_file import COMPONENTS_OUTPUT, INPUT_NAME, OUTPUT_NAMES, LoadedModel, load_model

log = logging.getLogger("ncguard.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
ALLOW_SPINNING = "session.intra_op.allow_spinning"  # ONNX Runtime session config key (see open_session)


def select_providers(requested: str | None, available: list[str]) -> list[str]:
    """Execution providers in preference order.

    `auto` takes CUDA when onnxruntime-gpu offers it (ONNX Runtime itself falls back to CPU when no
    GPU is present at session creation, and `Predictor.providers_` reports what was really used).
    """
    requested = (requested or "auto").lower()
    if requested not in PROVIDER_CHOICES:
        raise ConfigError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    if requested == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if requested == "cuda":
        raise ConfigError(
            "the CUDA provider was requested but this onnxruntime offers only "
            f"{', '.join(available)}; install onnxruntime-gpu in place of onnxruntime"
        )
    return [CPU]


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ModelError("onnxruntime is not installed: pip install 'ncguard[serve]' (or 'ncguard[gpu]')") from exc
    return onnxruntime


@dataclass(frozen=True)
class Predictions:
    logits: np.ndarray  # [N, C]
    probabilities: np.ndarray  # [N, C]
    ood_score: np.ndarray  # [N]
    features: np.ndarray  # [N, D] transfer features
    class_index: np.ndarray  # [N]
    confidence: np.ndarray  # [N] probability of the predicted class
    is_ood: np.ndarray  # [N] bool: score above the calibrated threshold
    finite: np.ndarray  # [N] bool: every output of the row is finite (see Predictor.predict)
    # [N] index into Predictor.component_names of the part of the score that is largest, i.e. what
    # drove the decision (fused: the most unusual standardized component); 0 for a single score
    driver: np.ndarray | None = None


def session_options(threads: int | None = None):
    """The SessionOptions every ncguard session uses (see open_session); benchmarks add their profiler to them."""
    options = _import_onnxruntime().SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.add_session_config_entry(ALLOW_SPINNING, "0")
    return options


def open_session(serialized: bytes, *, provider: str | None = None, threads: int | None = None):
    """An ONNX Runtime InferenceSession on the selected providers, for any serialized graph.

    Predictor uses it for verified ncguard models; the exporter uses it for its parity checks on
    a graph before metadata is stamped, so both run on the same providers and options.

    The intra-op threads do not spin. By default ONNX Runtime's idle pool threads busy-wait for the
    next parallel task, between the operators of a run and for a while after it; on a machine whose
    cores are shared (with a training job, with the HTTP server's own threads, with the client) the
    spinning threads take the cores from the thread that has the work. Measured on 2 shared cores
    with the Fashion-MNIST model: a bare session took 83 ms per 64-row call spinning and 50 ms not
    spinning (23 ms and 12 ms at 16 rows; the same 1.3 ms at 1 row).
    """
    ort = _import_onnxruntime()
    options = session_options(threads)
    wanted = select_providers(provider, ort.get_available_providers())
    try:
        session = ort.InferenceSession(serialized, sess_options=options, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types from C++
        raise ModelError(f"ONNX Runtime cannot load this model: {exc}") from exc
    log.info("ONNX Runtime providers: %s", ", ".join(session.get_providers()))
    return session


def check_provider(provider: str | None) -> list[str]:
    """The providers --provider selects on this machine (ConfigError if it cannot be honoured): asked
    before any slow work, so a wrong --provider fails at once."""
    return select_providers(provider, _import_onnxruntime().get_available_providers())


def run_batched(session, x: np.ndarray, names: list[str] | tuple[str, ...], batch_size: int = 256) -> list[np.ndarray]:
    """The named outputs for x [N, ...], fed to `session` batch_size rows at a time."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    parts = [session.run(list(names), {INPUT_NAME: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


class Predictor:
    """An ONNX Runtime session over one verified ncguard model."""

    def __init__(self, model: str | os.PathLike | LoadedModel, *, provider: str | None = None, threads: int | None = None,
                 verify_key=None):
        """`verify_key` (an Ed25519 public key or its PEM path) makes loading refuse a model not signed
        with it (model_file.load_model); a LoadedModel is taken as already verified by its loader."""
        self.model = model if isinstance(model, LoadedModel) else load_model(model, verify_key=verify_key)
        self.metadata = self.model.metadata
        self.session = open_session(self.model.serialized, provider=provider, threads=threads)
        self.providers_ = self.session.get_providers()
        # files exported before the ood_components output have one part: the score itself
        has_parts = bool(self.metadata.ood_components)
        self._outputs = (*OUTPUT_NAMES, COMPONENTS_OUTPUT) if has_parts else OUTPUT_NAMES
        self.component_names = list(self.metadata.ood_components) if has_parts else [self.metadata.score]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata.input_shape)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Return `x` as float32 [N, *input_shape], or raise DataError naming what is wrong."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise DataError(f"inputs must be numbers, got dtype {x.dtype}", reason="wrong_dtype")
        if x.shape[1:] != self.input_shape:
            if x.shape == self.input_shape:
                x = x[None]
            else:
                raise DataError(
                    f"inputs must have shape [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}",
                    reason="wrong_shape",
                )
        if len(x) == 0:
            raise DataError("the batch is empty", reason="empty_batch")
        with np.errstate(over="ignore"):
            x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise DataError("inputs contain NaN or infinity (or values beyond float32's range)", reason="not_finite")
        return x

    def predict(self, x: np.ndarray, batch_size: int = 256, *, strict: bool = True) -> Predictions:
        """Score a batch. Finite inputs far outside the training range can overflow float32 inside
        the network; such rows have no meaningful answer, so `strict` refuses the batch naming them,
        and otherwise they are marked in `Predictions.finite` for the caller to refuse one by one."""
        x = self.check_input(x)
        with np.errstate(invalid="ignore", over="ignore"):
            outputs = run_batched(self.session, x, self._outputs, batch_size)
        logits, probabilities, ood_score, features = outputs[:4]
        driver = outputs[4].argmax(axis=1) if len(outputs) > 4 else np.zeros(len(x), dtype=np.int64)
        finite = np.isfinite(logits).all(axis=1) & np.isfinite(probabilities).all(axis=1) & np.isfinite(ood_score) & np.isfinite(features).all(axis=1)
        if strict and not finite.all():
            raise DataError(overflow_message(np.flatnonzero(~finite)), reason="overflow")
        class_index = probabilities.argmax(axis=1)
        return Predictions(
            logits=logits,
            probabilities=probabilities,
            ood_score=ood_score,
            features=features,
            class_index=class_index,
            confidence=probabilities[np.arange(len(x)), class_index],
            is_ood=ood_score > self.metadata.threshold,
            finite=finite,
            driver=driver,
        )


def overflow_message(rows: np.ndarray) -> str:
    shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
    return (
        f"input rows {shown} drive the model's outputs to infinity or NaN: their values are far outside "
        "the range it was trained on (images are expected in [0, 1])"
    )
