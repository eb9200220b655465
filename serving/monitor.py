"""The drift monitor: what one worker served, compared with the reference stored in the model.

Every scored batch updates the counters (predictions by label, OOD-flagged inputs), the OOD-score
histogram, and bounded rolling windows of the latest scores, flags, predicted classes and transfer
features; the window gauges (OOD rate, PSI, KS, Jensen-Shannon, feature mean shift) are then
recomputed from the windows with the NumPy reference in ncguard.drift: in `observe`, or in the
service right after it by the monitor's own thread (DriftMonitor, background=True). Not at scrape
time, because /metrics may be answered by any worker and reads only what each worker has written
(multiprocess mode: see serving.metrics for how the workers' values are merged). The windows are
NumPy ring buffers (serving.window), read back as views: with deques of rows (the deque window
ncguard once had) rebuilding the 1000 x 256 feature window alone took about 1.3 ms per request.
Never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ncguard import drift
from ncguard.errors import DataError
from ncguard.model_file import ModelMetadata

from .metrics import ModelMetrics
from .window import RingWindow

log = logging.getLogger("ncguard.serving.monitor")

PUBLISH_INTERVAL_S = 0.1  # the background publisher's shortest pause between recomputations

class DriftMonitor:
    """Counters, histogram and rolling-window drift gauges of one served model, in one worker.

    Thread-safe: `observe` may be called from several threads at once (BentoML runs the batchable
    method in a thread pool). The windows hold at most `window` predictions each, and window gauges
    appear once `min_samples` predictions are in, so a few early requests are not read as drift.

    With `background=True` (the service) `observe` only counts and moves the windows (~0.3 ms for a
    batch of 64), and a daemon thread started by `start` recomputes the window gauges (PSI, KS, JS,
    mean shift: ~1.5 ms) after it, off the request path: it never blocks a request for longer than
    a snapshot of the windows takes, and batches that arrive while it computes are covered by its
    next pass, so nothing is queued and nothing is lost. Counters and the histogram are always
    updated in `observe` itself. `flush` waits until the gauges describe every batch observed so far.
    """

    def __init__(self, metadata: ModelMetadata, metrics: ModelMetrics, *, window: int, min_samples: int, background: bool = False):
        self.metadata = metadata
        self.metrics = metrics
        self.window = window
        self.min_samples = min_samples
        self._scores = RingWindow(window, np.float64)
        self._flags = RingWindow(window, bool)
        self._classes = RingWindow(window, np.int64)
        width = len(metadata.drift_reference.feature_mean)
        self._features = RingWindow(window, np.float64, (width,))
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._observed = 0  # batches moved into the windows
        self._published = 0  # batches the published gauges describe
        self._background = background
        self._publisher: threading.Thread | None = None
        self._features_usable = width > 0

    @property
    def model(self) -> str:
        return self.metadata.name

    def start(self) -> "DriftMonitor":
        """Publish what is known before any traffic: model info, expected OOD rate, zeroed counters."""
        meta = self.metadata
        m = self.metrics
        m.model_info.labels(model=self.model, version=meta.version, score=meta.score, threshold=repr(float(meta.threshold))).set(1)
        m.ood_rate_expected.labels(model=self.model).set(1.0 - meta.tpr)
        for label in meta.classes:
            m.predictions.labels(model=self.model, label=label)
        m.ood.labels(model=self.model)
        if self._background and self._publisher is None:
            self._publisher = threading.Thread(target=self._publish_loop, name="ncguard-drift-gauges", daemon=True)
            self._publisher.start()
        return self

    def observe(self, class_index, ood_score, is_ood, features) -> None:
        """Count one scored batch and move the windows and their gauges on.

        class_index [N] ints, ood_score [N], is_ood [N] bools, features [N, D] (the model's outputs).
        """
        class_index = np.asarray(class_index, dtype=np.int64).reshape(-1)
        ood_score = np.asarray(ood_score, dtype=np.float64).reshape(-1)
        is_ood = np.asarray(is_ood, dtype=bool).reshape(-1)
        features = np.asarray(features)  # the window stores float64; no copy of the batch here
        n = class_index.size
        if not (ood_score.size == is_ood.size == n and features.ndim == 2 and len(features) == n):
            raise DataError(
                f"a batch needs as many scores, flags and feature rows as predictions; got {n} classes, "
                f"{ood_score.size} scores, {is_ood.size} flags and features of shape {list(features.shape)}"
            )
        if n == 0:
            return
        self._count(class_index, ood_score, is_ood)
        finite = np.isfinite(ood_score)  # inputs are finite, but a model may still overflow
        with self._lock:  # the windows move together, so a snapshot always describes one window
            self._scores.extend(ood_score[finite])
            self._flags.extend(is_ood)
            self._classes.extend(class_index)
            self._extend_features(features)
            self._observed += 1
            if self._background:
                self._changed.notify_all()
                return
            self._publish(self._snapshot())
            self._published = self._observed

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the gauges describe every batch observed before this call; False on timeout."""
        with self._changed:
            target = self._observed
            return self._changed.wait_for(lambda: self._published >= target, timeout=timeout)

    def _publish_loop(self) -> None:
        """The background publisher: one recomputation per wake-up covers every batch since the last."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._published < self._observed)
                target, snapshot = self._observed, self._snapshot()
            try:
                self._publish(snapshot)
            except Exception:  # a broken gauge must not stop the next ones
                log.exception("the drift gauges could not be recomputed")
            with self._changed:
                self._published = target
                self._changed.notify_all()
            # Gauges are scraped every few seconds; recomputing them after every batch cost ~1.5 ms of
            # CPU (and the GIL) per lone request, taken from ONNX Runtime's threads on 2 cores. At most
            # one recomputation per interval; batches that arrive meanwhile are covered by the next.
            time.sleep(PUBLISH_INTERVAL_S)

    def _count(self, class_index: np.ndarray, ood_score: np.ndarray, is_ood: np.ndarray) -> None:
        m = self.metrics
        classes = self.metadata.classes
        for index, count in enumerate(np.bincount(class_index, minlength=len(classes))):
            if count:
                m.predictions.labels(model=self.model, label=classes[index]).inc(int(count))
        flagged = int(is_ood.sum())
        if flagged:
            m.ood.labels(model=self.model).inc(flagged)
        histogram = m.ood_score.labels(model=self.model)
        for score in ood_score[~np.isnan(ood_score)].tolist():  # NaN belongs in no bucket
            histogram.observe(score)

    def _extend_features(self, features: np.ndarray) -> None:
        if not self._features_usable:
            return
        width = self._features.item_shape[0]
        if features.shape[1] != width:
            self._features_usable = False
            log.warning(
                "the model's features have %d values but its drift reference has %d; the feature mean shift gauge is off",
                features.shape[1],
                width,
            )
            return
        self._features.extend(features[np.isfinite(features).all(axis=1)])

    def distances(self) -> dict[str, float]:
        """The current window statistics; a statistic is missing until its window holds min_samples."""
        with self._lock:
            snapshot = self._snapshot()
        return self._distances(snapshot)

    def _snapshot(self) -> dict:
        """What the gauges need from the windows, copied (caller holds the lock): the scores, the
        flags, class counts and the feature mean. Every statistic ignores the order within a window."""
        features = self._features.contents()
        return {
            "scores": self._scores.contents().copy(),
            "flags": self._flags.contents().copy(),
            "classes": self._classes.contents().copy(),
            "feature_count": len(features),
            "feature_mean": features.mean(axis=0) if len(features) else None,
        }

    def _distances(self, snapshot: dict) -> dict[str, float]:
        reference = self.metadata.drift_reference
        result: dict[str, float] = {}
        scores = snapshot["scores"]
        if len(scores) >= self.min_samples:
            result["score_psi"] = drift.psi(scores, reference.score_quantiles)
            result["score_ks"] = drift.ks_distance(scores, reference.score_quantiles)
        flags = snapshot["flags"]
        if len(flags) >= self.min_samples:
            result["ood_rate"] = float(flags.mean())
        classes = snapshot["classes"]
        if len(classes) >= self.min_samples:
            result["class_js"] = drift.js_distance(drift.class_distribution(classes, len(self.metadata.classes)), reference.class_priors)
        if snapshot["feature_count"] >= self.min_samples:
            result["feature_mean_shift"] = drift.mean_shift(snapshot["feature_mean"], reference.feature_mean, reference.feature_std)
        return result

    def _publish(self, snapshot: dict) -> None:
        m = self.metrics
        gauges = {
            "ood_rate": m.ood_rate,
            "score_psi": m.score_psi,
            "score_ks": m.score_ks,
            "class_js": m.class_js,
            "feature_mean_shift": m.feature_shift,
        }
        for name, value in self._distances(snapshot).items():
            gauges[name].labels(model=self.model).set(value)
        m.window_samples.labels(model=self.model).set(len(snapshot["flags"]))
