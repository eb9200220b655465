"""The service's own Prometheus metrics (prefix `ncguard_`, label `model`; DESIGN.md section 3).

BentoML runs prometheus-client in multiprocess mode and sets PROMETHEUS_MULTIPROC_DIR in each
worker *after* the service module is imported; metrics created before that would live in a
private registry that /metrics never shows. So they are created on first use, once per process,
and BentoML's /metrics endpoint (its MultiProcessCollector) exports them with its own.

Several workers. Counters and the histogram add up across workers, which is what they mean. A
rolling-window gauge is different: each worker keeps its own window of the traffic it served, so
the collector holds one value per worker and must reduce them to one series. We take `livemax`,
the largest value among the workers alive now: load is spread over workers at random, so every
worker's window is a sample of the same traffic and the largest is a (slightly conservative)
reading of it, while a drift that reaches only one worker (one client pinned to one connection)
still shows instead of being averaged away; `live` drops the windows of workers that have exited.
`liveall` (one series per pid) would move the reduction into every query and alert and leave
series behind at every restart. The window fill, whose sum is meaningful, is the exception: it
is kept per pid (`liveall`), which also shows how traffic is spread over the workers.
"""

from __future__ import annotations

import functools
import threading
from typing import Sequence

_lock = threading.Lock()

# Every reason a request can be refused with; the label values of ncguard_rejected_inputs_total.
REJECTION_REASONS = (
    "malformed_json",
    "malformed_npy",
    "missing_field",
    "wrong_shape",
    "wrong_dtype",
    "not_finite",
    "overflow",
    "invalid_input",
    "empty_batch",
    "batch_too_large",
    "body_too_large",
    "malformed_multipart",
    "bad_image",
    "image_too_large",
    "unsupported_media_type",
)

WINDOW_GAUGE_MODE = "livemax"  # see the module docstring


@functools.cache
def rejected_inputs_counter():
    import prometheus_client

    return prometheus_client.Counter(
        "ncguard_rejected_inputs",
        "Requests refused by input validation, by reason",
        labelnames=("model", "reason"),
    )


def count_rejection(model: str, reason: str) -> None:
    with _lock:  # functools.cache alone could build the counter twice under a race
        counter = rejected_inputs_counter()
    counter.labels(model=model, reason=reason).inc()


def start_rejection_counts(model: str) -> None:
    """Create every reason's series at 0, so rates and alerts see a value before the first refusal."""
    with _lock:
        counter = rejected_inputs_counter()
    for reason in REJECTION_REASONS:
        counter.labels(model=model, reason=reason)


class ModelMetrics:
    """The per-model metrics the drift monitor writes, on one registry.

    The service builds one per process with `model_metrics` (on the default registry, which
    multiprocess mode exports); tests build their own on a fresh CollectorRegistry.
    """

    def __init__(self, score_buckets: Sequence[float], registry=None):
        import prometheus_client

        if registry is None:
            registry = prometheus_client.REGISTRY
        model = ("model",)

        def gauge(name: str, documentation: str, mode: str = WINDOW_GAUGE_MODE, labelnames=model):
            return prometheus_client.Gauge(name, documentation, labelnames=labelnames, registry=registry, multiprocess_mode=mode)

        self.predictions = prometheus_client.Counter(
            "ncguard_predictions", "Predictions served, by predicted label", labelnames=("model", "label"), registry=registry
        )
        self.ood = prometheus_client.Counter(
            "ncguard_ood", "Inputs whose OOD score is above the model's threshold", labelnames=model, registry=registry
        )
        # component values come from the model file's metadata, never from requests (bounded)
        self.ood_by_component = prometheus_client.Counter(
            "ncguard_ood_decisions",
            "OOD decisions by the part of the score that drove them (e.g. block3:mahalanobis = pixel- or shape-level statistics, detection:ddu-lowrank = no known class)",
            labelnames=("model", "component"),
            registry=registry,
        )
        self.ood_score = prometheus_client.Histogram(
            "ncguard_ood_score",
            "OOD scores of served inputs; buckets at the model's in-distribution score quantiles",
            labelnames=model,
            buckets=tuple(score_buckets),
            registry=registry,
        )
        self.ood_rate = gauge("ncguard_ood_rate", "Fraction of OOD-flagged inputs in the rolling window")
        self.ood_rate_expected = gauge(
            "ncguard_ood_rate_expected", "OOD rate expected on in-distribution traffic: 1 - the TPR the threshold keeps"
        )
        self.score_psi = gauge(
            "ncguard_drift_score_psi", "Population stability index of the window's OOD scores against the reference (decile bins)"
        )
        self.score_ks = gauge(
            "ncguard_drift_score_ks", "Kolmogorov-Smirnov distance of the window's OOD scores to the reference distribution"
        )
        self.class_js = gauge(
            "ncguard_drift_class_js", "Jensen-Shannon distance (base 2) of the window's predicted classes to the training class priors"
        )
        self.feature_shift = gauge(
            "ncguard_drift_feature_mean_shift",
            "Mean over transfer features of |window mean - reference mean| / reference std",
        )
        self.window_samples = gauge(
            "ncguard_drift_window_samples", "Predictions in this worker's drift window (one series per worker)", mode="liveall"
        )
        self.model_info = gauge(
            "ncguard_model_info",
            "The served model: version, OOD score and threshold (value 1)",
            labelnames=("model", "version", "score", "threshold"),
        )


_model_metrics: ModelMetrics | None = None


def model_metrics(score_buckets: Sequence[float]) -> ModelMetrics:
    """This process's ModelMetrics, created on first use (one model per worker, so one bucket layout)."""
    global _model_metrics
    with _lock:
        if _model_metrics is None:
            _model_metrics = ModelMetrics(score_buckets)
        return _model_metrics


# ----------------------------------------------------------------------------- the HTTP layer
# BentoML's own request metrics are switched off in the service (serving.service): they label
# every unmatched path with the raw path (1,000 distinct 404s grew /metrics by 4.5 MB) and cost a
# share of every request. These replace them with the same label names, so dashboards read alike,
# and with an `endpoint` drawn from a fixed set: the public routes, or "other".
PUBLIC_ENDPOINTS = ("/predict", "/predict_image", "/model", "/metrics", "/livez", "/readyz", "/healthz", "/docs.json", "/schema.json")
OTHER_ENDPOINT = "other"
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def endpoint_label(path: str) -> str:
    """The `endpoint` label of a request path: a public route, or "other" (bounded cardinality)."""
    path = path.rstrip("/") or "/"
    return path if path in PUBLIC_ENDPOINTS else OTHER_ENDPOINT


class ServiceMetrics:
    """Requests, their latency, shed requests and batch sizes of one worker's HTTP service."""

    def __init__(self, registry=None):
        import prometheus_client

        if registry is None:
            registry = prometheus_client.REGISTRY
        self.requests = prometheus_client.Counter(
            "ncguard_http_requests",
            "HTTP requests answered, by endpoint (a public route or 'other') and status code",
            labelnames=("model", "endpoint", "http_response_code"),
            registry=registry,
        )
        self.duration = prometheus_client.Histogram(
            "ncguard_http_request_duration_seconds",
            "Time from the request's arrival to its answer, by endpoint",
            labelnames=("model", "endpoint"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.shed = prometheus_client.Counter(
            "ncguard_shed_requests",
            "Requests answered 503 because the batching queue was full or they waited past their latency budget",
            labelnames=("model",),
            registry=registry,
        )
        self.batch_rows = prometheus_client.Histogram(
            "ncguard_batch_rows",
            "Rows per ONNX Runtime call: how many inputs concurrent requests merged into",
            labelnames=("model",),
            buckets=BATCH_ROW_BUCKETS,
            registry=registry,
        )


_service_metrics: ServiceMetrics | None = None


def service_metrics() -> ServiceMetrics:
    """This process's ServiceMetrics, created on first use."""
    global _service_metrics
    with _lock:
        if _service_metrics is None:
            _service_metrics = ServiceMetrics()
        return _service_metrics
