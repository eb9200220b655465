"""The service's own Prometheus metrics (prefix `ncguard_`, label `model`).

BentoML runs prometheus-client in multiprocess mode and sets PROMETHEUS_MULTIPROC_DIR in each
worker *after* the service module is imported; metrics created before that would live in a
private registry that /metrics never shows. So they are created on first use, once per process,
and BentoML's /metrics endpoint (its MultiProcessCollector) exports them with its own.
"""

from __future__ import annotations

import functools
import threading

_lock = threading.Lock()

# Every reason a request can be refused with; the label values of ncguard_rejected_inputs_total.
REJECTION_REASONS = (
    "malformed_json",
    "missing_field",
    "wrong_shape",
    "wrong_dtype",
    "not_finite",
    "empty_batch",
    "batch_too_large",
    "body_too_large",
    "malformed_multipart",
    "bad_image",
    "image_too_large",
)


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
