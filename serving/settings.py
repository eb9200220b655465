"""What the service is told through its environment, read and checked in one place.

`ncguard serve` sets these variables before BentoML starts its workers; a Bento (or a plain
`bentoml serve serving.service:NcguardService`) reads the same ones, so every way of starting the
service takes the same options. Torch-free and cheap: read at import time by serving.service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ncguard.errors import ConfigError
from ncguard.runtime import PROVIDER_CHOICES

MODEL_ENV = "NCGUARD_MODEL"  # path of an exported .onnx file
MODEL_TAG_ENV = "NCGUARD_MODEL_TAG"  # a tag in BentoML's model store (used when MODEL_ENV is unset)
DEFAULT_MODEL_TAG = "ncguard-model:latest"  # what bentofile.yaml packs into the Bento
WORKERS_ENV = "NCGUARD_WORKERS"
PROVIDER_ENV = "NCGUARD_PROVIDER"
THREADS_ENV = "NCGUARD_THREADS"
MAX_BATCH_INPUTS_ENV = "NCGUARD_MAX_BATCH_INPUTS"
MAX_BODY_BYTES_ENV = "NCGUARD_MAX_BODY_BYTES"
MAX_IMAGE_PIXELS_ENV = "NCGUARD_MAX_IMAGE_PIXELS"
MAX_REQUEST_PIXELS_ENV = "NCGUARD_MAX_REQUEST_PIXELS"
VERIFY_KEY_ENV = "NCGUARD_VERIFY_KEY"  # public key PEM: workers refuse a model not signed with it
BATCH_SIZE_ENV = "NCGUARD_BATCH_SIZE"
BATCH_LATENCY_MS_ENV = "NCGUARD_BATCH_LATENCY_MS"
DRIFT_WINDOW_ENV = "NCGUARD_DRIFT_WINDOW"
DRIFT_MIN_SAMPLES_ENV = "NCGUARD_DRIFT_MIN_SAMPLES"

# Adaptive batching defaults, from the batching grid that benchmarks/serving/bench_serving.py ran up
# to commit 0f7dd44 (its benchmarks/results/serving.md, digits CNN on 2 shared cores): ONNX Runtime's cost per row falls from ~620 us at batch 1 to ~95 us
# at 64 and rises again at 256, hence 64. Under 8 concurrent clients a latency ceiling of 10 ms made
# BentoML shed 40-65% of requests with 503 and 100 ms still shed some in one run, while 1000 ms shed
# none and still answered a lone request at once (the ceiling bounds waiting; it is not a fixed wait).
# Requests of at least DEFAULT_BATCH_SIZE rows, and requests that arrive while no other is in
# flight, skip the batching queue (serving.service).
DEFAULT_BATCH_SIZE = 64
DEFAULT_BATCH_LATENCY_MS = 1000
DEFAULT_MAX_BATCH_INPUTS = 256
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Pixels one /predict_image request may decode, all its images together (read from the headers
# before any is decoded). Decoding costs CPU and memory per pixel (~3 bytes per RGB pixel, and
# some ms per megapixel), so a per-image cap alone let 32 images of 4096x4096 (a 0.5 MB request of
# flat PNGs) cost 2.3 s of server CPU. The default, 4096*4096 = 256 * 256*256, still takes one
# image at the per-image cap, or a full default batch (256) of 256x256 images, and bounds a
# request to what one largest image costs (about 50 MB decoded); the models we serve take
# 8x8 to 28x28 inputs, so larger sources only add decoding work. When unset it is never below
# NCGUARD_MAX_IMAGE_PIXELS, so raising the per-image cap alone still admits one such image.
DEFAULT_MAX_REQUEST_PIXELS = 4096 * 4096

# Drift windows (per worker). Sampling noise alone gives a same-distribution window of n scores a
# decile PSI of about 9/n and a KS distance of about 0.9/sqrt(n): 1000 keeps both an order of
# magnitude under the alert thresholds (0.25 and 0.2), and a window still turns over within
# minutes at a few requests per second. Gauges wait for 200 values (PSI noise ~0.05) so that
# the first requests after a start do not read as drift.
DEFAULT_DRIFT_WINDOW = 1000
DEFAULT_DRIFT_MIN_SAMPLES = 200


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{name}={value} must be at least 1")
    return value


@dataclass(frozen=True)
class ServeSettings:
    model_path: str | None
    model_tag: str
    workers: int
    provider: str
    threads: int | None  # ONNX Runtime intra-op threads per worker; None lets ONNX Runtime decide
    max_batch_inputs: int  # inputs one request may carry
    max_body_bytes: int
    max_image_pixels: int
    batch_size: int  # adaptive batching: most rows in one ONNX Runtime call
    batch_latency_ms: int  # adaptive batching: latency ceiling before BentoML sheds load
    drift_window: int = DEFAULT_DRIFT_WINDOW  # most recent predictions each worker's drift gauges cover
    drift_min_samples: int = DEFAULT_DRIFT_MIN_SAMPLES  # predictions a worker needs before it publishes them
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # pixels of all images of one /predict_image request
    verify_key: str | None = None  # public key PEM path: load only models signed with its private key

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServeSettings":
        environ = os.environ if environ is None else environ
        provider = environ.get(PROVIDER_ENV, "").strip().lower() or "auto"
        if provider not in PROVIDER_CHOICES:
            raise ConfigError(f"{PROVIDER_ENV}={provider!r}: choose one of {', '.join(PROVIDER_CHOICES)}")
        threads = environ.get(THREADS_ENV, "").strip()
        batch_size = _positive_int(environ, BATCH_SIZE_ENV, DEFAULT_BATCH_SIZE)
        if batch_size < 2:
            raise ConfigError(f"{BATCH_SIZE_ENV}={batch_size}: adaptive batching needs a batch size of at least 2")
        drift_window = _positive_int(environ, DRIFT_WINDOW_ENV, DEFAULT_DRIFT_WINDOW)
        drift_min_samples = _positive_int(environ, DRIFT_MIN_SAMPLES_ENV, min(DEFAULT_DRIFT_MIN_SAMPLES, drift_window))
        if drift_min_samples > drift_window:
            raise ConfigError(
                f"{DRIFT_MIN_SAMPLES_ENV}={drift_min_samples} is larger than the drift window "
                f"({DRIFT_WINDOW_ENV}={drift_window}): the gauges would never be published"
            )
        return cls(
            model_path=environ.get(MODEL_ENV, "").strip() or None,
            model_tag=environ.get(MODEL_TAG_ENV, "").strip() or DEFAULT_MODEL_TAG,
            workers=_positive_int(environ, WORKERS_ENV, 1),
            provider=provider,
            threads=_positive_int(environ, THREADS_ENV, 1) if threads else None,
            max_batch_inputs=_positive_int(environ, MAX_BATCH_INPUTS_ENV, DEFAULT_MAX_BATCH_INPUTS),
            max_body_bytes=_positive_int(environ, MAX_BODY_BYTES_ENV, DEFAULT_MAX_BODY_BYTES),
            max_image_pixels=_positive_int(environ, MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS),
            batch_size=batch_size,
            batch_latency_ms=_positive_int(environ, BATCH_LATENCY_MS_ENV, DEFAULT_BATCH_LATENCY_MS),
            drift_window=drift_window,
            drift_min_samples=drift_min_samples,
            max_request_pixels=_positive_int(
                environ, MAX_REQUEST_PIXELS_ENV,
                max(DEFAULT_MAX_REQUEST_PIXELS, _positive_int(environ, MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS)),
            ),
            verify_key=environ.get(VERIFY_KEY_ENV, "").strip() or None,
        )
