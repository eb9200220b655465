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

from .access import configured_keys

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
HEADER_TIMEOUT_ENV = "NCGUARD_HEADER_TIMEOUT_S"  # seconds a connection may take to send a request head (serving.header_timeout)
BATCH_SIZE_ENV = "NCGUARD_BATCH_SIZE"
BATCH_LATENCY_MS_ENV = "NCGUARD_BATCH_LATENCY_MS"
MAX_QUEUE_ROWS_ENV = "NCGUARD_MAX_QUEUE_ROWS"
LARGE_BODY_SLOTS_ENV = "NCGUARD_LARGE_BODY_SLOTS"
ACCESS_LOG_ENV = "NCGUARD_ACCESS_LOG"
TRACING_ENV = "NCGUARD_TRACING"
DRIFT_WINDOW_ENV = "NCGUARD_DRIFT_WINDOW"
DRIFT_MIN_SAMPLES_ENV = "NCGUARD_DRIFT_MIN_SAMPLES"

# Batching (serving.batcher). ONNX Runtime's cost per row falls from ~620 us at batch 1 to ~95 us
# at 64 and rises again at 256 (digits CNN, 2 shared cores; benchmarks/serving), hence batches of
# at most 64 rows. The latency budget is how long a request may wait in the queue before it is
# shed with 503 + Retry-After: 5 s, well inside the usual client timeouts (BentoML's own is 60 s),
# since 1 s shed JSON requests at 32 clients of 64 rows on a busy 2-core machine. The queue takes at
# most MAX_QUEUE_ROWS rows (a little over 1 s of scoring at batch 64 on these machines), and a
# request that would overfill it is refused at once. Neither is a fixed wait: a lone request is
# scored at once.
DEFAULT_BATCH_SIZE = 64
DEFAULT_BATCH_LATENCY_MS = 5000
DEFAULT_MAX_QUEUE_ROWS = 4096
# Bodies over LARGE_BODY_BYTES are read and parsed at most LARGE_BODY_SLOTS at a time per worker
# (serving.limits): memory then grows with the slots, not with the number of large requests.
LARGE_BODY_BYTES = 1024 * 1024
DEFAULT_LARGE_BODY_SLOTS = 2
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
# A legitimate client sends its request head in one packet, within milliseconds; 10 s leaves room
# for a slow link or a stalled proxy, and is the most one idle or trickling connection can hold a
# worker's connection slot (uvicorn itself never times a request head out: serving.header_timeout).
DEFAULT_HEADER_TIMEOUT_S = 10

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


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r}: use 1 or 0")


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
    batch_latency_ms: int  # the longest a request may wait in the batching queue before it is shed (503)
    drift_window: int = DEFAULT_DRIFT_WINDOW  # most recent predictions each worker's drift gauges cover
    drift_min_samples: int = DEFAULT_DRIFT_MIN_SAMPLES  # predictions a worker needs before it publishes them
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # pixels of all images of one /predict_image request
    max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS  # rows waiting in a worker's batching queue before requests are refused (503)
    large_body_slots: int = DEFAULT_LARGE_BODY_SLOTS  # large bodies (> LARGE_BODY_BYTES) a worker reads and parses at once
    access_log: bool = False  # one log line per request (BentoML's access log); off: it costs every request
    tracing: bool = False  # OpenTelemetry spans for every request (only useful with a tracing exporter configured in BentoML)
    api_keys: tuple[str, ...] = ()  # when set, requests need one of them (serving.access)
    verify_key: str | None = None  # public key PEM path: load only models signed with its private key
    header_timeout_s: int = DEFAULT_HEADER_TIMEOUT_S  # close connections whose request head takes longer

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
            max_queue_rows=_positive_int(environ, MAX_QUEUE_ROWS_ENV, DEFAULT_MAX_QUEUE_ROWS),
            large_body_slots=_positive_int(environ, LARGE_BODY_SLOTS_ENV, DEFAULT_LARGE_BODY_SLOTS),
            access_log=_flag(environ, ACCESS_LOG_ENV),
            tracing=_flag(environ, TRACING_ENV),
            api_keys=configured_keys(environ),
            verify_key=environ.get(VERIFY_KEY_ENV, "").strip() or None,
            header_timeout_s=_positive_int(environ, HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S),
        )
