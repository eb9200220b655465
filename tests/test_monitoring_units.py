"""The drift monitor without a server: counters, histogram buckets and window gauges on a private
registry, against the NumPy reference in ncguard.drift; settings; the generated monitoring files."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from ncguard import drift
from ncguard.errors import ConfigError, DataError
from ncguard.model_file import DriftReference
from serving.dashboards import generate
from serving.metrics import ModelMetrics
from ncguard.drift import score_buckets
from serving.monitor import DriftMonitor
from serving.settings import DEFAULT_DRIFT_MIN_SAMPLES, DEFAULT_DRIFT_WINDOW, ServeSettings
from serving.window import RingWindow
from tests.tiny_models import tiny_metadata

CLASSES = ["cat", "dog", "owl"]
WIDTH = 4
GAUGES = {
    "ood_rate": "ncguard_ood_rate",
    "score_psi": "ncguard_drift_score_psi",
    "score_ks": "ncguard_drift_score_ks",
    "class_js": "ncguard_drift_class_js",
    "feature_mean_shift": "ncguard_drift_feature_mean_shift",
}


def make_metadata(feature_width: int = WIDTH):
    rng = np.random.default_rng(0)
    reference = DriftReference(
        score_quantiles=list(drift.reference_quantiles(rng.normal(size=5000))),
        class_priors=[0.5, 0.3, 0.2],
        feature_mean=[0.0] * feature_width,
        feature_std=[1.0] * feature_width,
    )
    return tiny_metadata(CLASSES, (WIDTH,), WIDTH, name="unit", score="energy", threshold=1.6, tpr=0.95, drift_reference=reference)


def make_monitor(window: int = 50, min_samples: int = 20, metadata=None):
    metadata = metadata or make_metadata()
    registry = CollectorRegistry()
    buckets = score_buckets(metadata.drift_reference.score_quantiles, metadata.threshold)
    monitor = DriftMonitor(metadata, ModelMetrics(buckets, registry=registry), window=window, min_samples=min_samples).start()
    return monitor, registry


def batch(rng, n: int, shift: float = 0.0):
    """Model outputs for n inputs: classes, scores, flags (score > 1.6, the metadata threshold), features."""
    classes = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    scores = rng.normal(loc=shift, size=n)
    return classes, scores, scores > 1.6, rng.normal(loc=shift, size=(n, WIDTH))


def gauge(registry, name: str, model: str = "unit"):
    return registry.get_sample_value(name, {"model": model})


# ----------------------------------------------------------------------------- histogram buckets
def test_score_buckets_follow_the_reference_and_reach_past_it():
    quantiles = drift.reference_quantiles(np.random.default_rng(1).gamma(2.0, size=2000))
    bounds = score_buckets(quantiles, threshold=float(np.quantile(quantiles, 0.95)))
    assert list(bounds) == sorted(set(bounds)), "bucket bounds must be distinct and increasing"
    assert bounds[0] == pytest.approx(quantiles[0], rel=1e-5)
    assert pytest.approx(quantiles[len(quantiles) // 2], rel=1e-5) in bounds  # the median is a bound
    # most bounds sit inside the in-distribution range, and some beyond it for OOD scores
    inside = [b for b in bounds if b <= quantiles[-1] * (1 + 1e-5)]
    assert len(inside) >= 8
    assert bounds[-1] > quantiles[-1] + 8 * (quantiles[-1] - quantiles[0])


def test_score_buckets_hold_the_threshold_and_survive_a_constant_reference():
    bounds = score_buckets([-1.0] * 100, threshold=-0.5)
    assert -1.0 in bounds and -0.5 in bounds
    assert len(bounds) > 3 and list(bounds) == sorted(set(bounds))


@pytest.mark.parametrize("quantiles, threshold", [([1.0], 0.5), ([0.0, float("nan")], 0.5), ([0.0, 1.0], float("inf"))])
def test_score_buckets_refuse_unusable_references(quantiles, threshold):
    with pytest.raises(DataError):
        score_buckets(quantiles, threshold)


# ----------------------------------------------------------------------------- the monitor
def test_model_info_and_zeroed_counters_exist_before_any_traffic():
    monitor, registry = make_monitor()
    info = {"model": "unit", "version": monitor.metadata.version, "score": "energy", "threshold": "1.6"}
    assert registry.get_sample_value("ncguard_model_info", info) == 1
    assert gauge(registry, "ncguard_ood_rate_expected") == pytest.approx(0.05)
    for label in CLASSES:
        assert registry.get_sample_value("ncguard_predictions_total", {"model": "unit", "label": label}) == 0
    assert gauge(registry, "ncguard_ood_total") == 0
    assert all(gauge(registry, name) is None for name in GAUGES.values())


def test_counters_and_histogram_count_every_prediction():
    monitor, registry = make_monitor()
    rng = np.random.default_rng(2)
    seen = [batch(rng, n) for n in (7, 1, 30, 12)]
    for classes, scores, flags, features in seen:
        monitor.observe(classes, scores, flags, features)
    classes = np.concatenate([b[0] for b in seen])
    scores = np.concatenate([b[1] for b in seen])
    flags = np.concatenate([b[2] for b in seen])
    for index, label in enumerate(CLASSES):
        expected = int((classes == index).sum())
        assert registry.get_sample_value("ncguard_predictions_total", {"model": "unit", "label": label}) == expected
    assert gauge(registry, "ncguard_ood_total") == int(flags.sum())
    assert gauge(registry, "ncguard_ood_score_count") == len(scores)
    for bound in score_buckets(monitor.metadata.drift_reference.score_quantiles, 1.6):
        cumulative = registry.get_sample_value("ncguard_ood_score_bucket", {"model": "unit", "le": floatToGoString(bound)})
        assert cumulative == int((scores <= bound).sum())


def test_window_gauges_appear_at_min_samples_and_equal_the_reference_statistics():
    monitor, registry = make_monitor(window=50, min_samples=20)
    rng = np.random.default_rng(3)
    monitor.observe(*batch(rng, 19))
    assert all(gauge(registry, name) is None for name in GAUGES.values())
    history = [batch(rng, 19)]
    monitor.observe(*history[0])
    assert all(gauge(registry, name) is not None for name in GAUGES.values())
    for _ in range(6):  # past the window size: the gauges follow only the last 50 predictions
        history.append(batch(rng, 13, shift=1.0))
        monitor.observe(*history[-1])
    last = [np.concatenate([b[k] for b in history])[-50:] for k in range(4)]
    reference = monitor.metadata.drift_reference
    expected = {
        "ood_rate": last[2].mean(),
        "score_psi": drift.psi(last[1], reference.score_quantiles),
        "score_ks": drift.ks_distance(last[1], reference.score_quantiles),
        "class_js": drift.js_distance(drift.class_distribution(last[0], 3), reference.class_priors),
        "feature_mean_shift": drift.mean_shift(last[3].mean(axis=0), reference.feature_mean, reference.feature_std),
    }
    for key, name in GAUGES.items():
        assert gauge(registry, name) == pytest.approx(expected[key], rel=1e-12), key
    assert gauge(registry, "ncguard_drift_window_samples") == 50


def test_drift_gauges_carry_distances_that_grow_with_the_shift():
    readings = []
    for shift in (0.0, 0.5, 2.0):
        monitor, registry = make_monitor(window=400, min_samples=400)
        monitor.observe(*batch(np.random.default_rng(4), 400, shift=shift))
        readings.append({key: gauge(registry, name) for key, name in GAUGES.items() if key != "class_js"})
    for key in readings[0]:
        assert readings[0][key] < readings[1][key] < readings[2][key], key
    assert readings[0]["score_psi"] < 0.1 and readings[2]["score_psi"] > 1.0


def test_windows_stay_bounded():
    monitor, registry = make_monitor(window=30, min_samples=10)
    rng = np.random.default_rng(5)
    for _ in range(40):
        monitor.observe(*batch(rng, 17))
    assert gauge(registry, "ncguard_drift_window_samples") == 30
    assert len(monitor._scores) == len(monitor._classes) == len(monitor._features) == 30


@pytest.mark.parametrize("size", [1, 5, 8])
def test_ring_window_keeps_the_latest_items_like_a_bounded_deque(size):
    """Against collections.deque(maxlen=size), batch by batch."""
    import collections

    rng = np.random.default_rng(size)
    ring, reference = RingWindow(size, np.float64, (2,)), collections.deque(maxlen=size)
    for n in (0, 1, 3, size, 2, size + 3, 1, 4):
        rows = rng.normal(size=(n, 2)).astype(np.float32)  # stored as float64, like the monitor's features
        ring.extend(rows)
        reference.extend(rows.astype(np.float64))
        expected = np.asarray(reference).reshape(-1, 2)
        assert len(ring) == len(reference)
        np.testing.assert_array_equal(ring.values(), expected)
        # storage order may be rotated, but it holds the same items
        np.testing.assert_array_equal(np.sort(ring.contents(), axis=0), np.sort(expected, axis=0))
        assert ring.values().dtype == np.float64


def test_ring_window_refuses_bad_sizes_and_items_of_another_shape():
    for size in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            RingWindow(size, np.float64)
    ring = RingWindow(3, np.int64)
    with pytest.raises(DataError, match="shape"):
        ring.extend(np.zeros((2, 4)))
    assert len(ring) == 0


def test_concurrent_batches_are_all_counted_and_the_gauges_describe_the_final_window():
    monitor, registry = make_monitor(window=100, min_samples=10)
    n_threads, n_batches, size = 8, 40, 5

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(n_batches):
            monitor.observe(*batch(rng, size))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(registry.get_sample_value("ncguard_predictions_total", {"model": "unit", "label": label}) for label in CLASSES)
    assert total == n_threads * n_batches * size
    assert gauge(registry, "ncguard_ood_score_count") == n_threads * n_batches * size
    final = monitor.distances()
    for key, name in GAUGES.items():
        assert gauge(registry, name) == pytest.approx(final[key], rel=1e-12), key


def test_background_gauges_catch_up_with_every_batch_and_counters_never_wait():
    """The service's mode: gauges recomputed by the monitor's own thread, counters in observe itself."""
    metadata = make_metadata()
    registry = CollectorRegistry()
    buckets = score_buckets(metadata.drift_reference.score_quantiles, metadata.threshold)
    monitor = DriftMonitor(metadata, ModelMetrics(buckets, registry=registry), window=100, min_samples=10, background=True).start()
    assert monitor.flush(timeout=5)  # nothing observed yet: nothing to wait for
    n_threads, n_batches, size = 6, 30, 4
    counted_at_once = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for done in range(1, n_batches + 1):
            monitor.observe(*batch(rng, size, shift=seed / 4))
            # this thread's own batches are counted when observe returns, whatever the publisher does
            counted_at_once.append(gauge(registry, "ncguard_ood_score_count") >= done * size)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(counted_at_once) and len(counted_at_once) == n_threads * n_batches
    assert gauge(registry, "ncguard_ood_score_count") == n_threads * n_batches * size
    assert monitor.flush(timeout=10)
    final = monitor.distances()
    assert set(final) == set(GAUGES)
    for key, name in GAUGES.items():
        assert gauge(registry, name) == pytest.approx(final[key], rel=1e-12), key
    assert gauge(registry, "ncguard_drift_window_samples") == 100
    # one more batch moves the gauges again once the publisher has run
    monitor.observe(*batch(np.random.default_rng(99), 50, shift=3.0))
    assert monitor.flush(timeout=10)
    assert gauge(registry, "ncguard_drift_score_psi") == pytest.approx(monitor.distances()["score_psi"], rel=1e-12)
    assert gauge(registry, "ncguard_drift_score_psi") > final["score_psi"]


def test_non_finite_scores_and_a_mismatched_feature_width_do_not_stop_the_other_gauges():
    monitor, registry = make_monitor(window=40, min_samples=10, metadata=make_metadata(feature_width=WIDTH + 1))
    classes, scores, flags, features = batch(np.random.default_rng(6), 20)
    scores[:3] = [np.inf, np.nan, -np.inf]
    monitor.observe(classes, scores, flags, features)
    assert gauge(registry, "ncguard_drift_score_psi") == pytest.approx(drift.psi(scores[3:], monitor.metadata.drift_reference.score_quantiles))
    assert gauge(registry, "ncguard_drift_feature_mean_shift") is None
    assert gauge(registry, "ncguard_ood_score_count") == 19  # infinities have buckets, NaN has none


def test_a_batch_with_inconsistent_lengths_is_a_data_error():
    monitor, _ = make_monitor()
    classes, scores, flags, features = batch(np.random.default_rng(7), 5)
    with pytest.raises(DataError, match="as many scores"):
        monitor.observe(classes, scores[:4], flags, features)


# ----------------------------------------------------------------------------- settings
def test_drift_window_settings_come_from_the_environment():
    defaults = ServeSettings.from_env({})
    assert (defaults.drift_window, defaults.drift_min_samples) == (DEFAULT_DRIFT_WINDOW, DEFAULT_DRIFT_MIN_SAMPLES)
    small = ServeSettings.from_env({"NCGUARD_DRIFT_WINDOW": "50"})
    assert (small.drift_window, small.drift_min_samples) == (50, 50)
    chosen = ServeSettings.from_env({"NCGUARD_DRIFT_WINDOW": "300", "NCGUARD_DRIFT_MIN_SAMPLES": "30"})
    assert (chosen.drift_window, chosen.drift_min_samples) == (300, 30)


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"NCGUARD_DRIFT_WINDOW": "0"}, "NCGUARD_DRIFT_WINDOW=0 must be at least 1"),
        ({"NCGUARD_DRIFT_WINDOW": "many"}, "not a whole number"),
        ({"NCGUARD_DRIFT_WINDOW": "100", "NCGUARD_DRIFT_MIN_SAMPLES": "101"}, "larger than the drift window"),
    ],
)
def test_bad_drift_window_settings_are_config_errors(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ServeSettings.from_env(env)


# ----------------------------------------------------------------------------- monitoring files
def test_checked_in_dashboard_and_rules_match_their_generator():
    assert generate.DASHBOARD_PATH.read_text() == generate.dashboard_text(), "run python -m serving.dashboards.generate"
    assert generate.RULES_PATH.read_text() == generate.rules_text(), "run python -m serving.dashboards.generate"


def test_dashboard_has_a_panel_for_every_monitored_quantity():
    board = json.loads(generate.DASHBOARD_PATH.read_text())
    queries = "\n".join(generate.dashboard_queries(board))
    for metric in (
        "ncguard_http_requests_total",
        "ncguard_http_request_duration_seconds_bucket",
        "ncguard_shed_requests_total",
        "ncguard_ood_decisions_total",
        "ncguard_ood_rate{",
        "ncguard_ood_score_bucket",
        "ncguard_predictions_total",
        "ncguard_rejected_inputs_total",
        *GAUGES.values(),
    ):
        assert metric in queries, metric
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:  # panels stay on Grafana's 24-column grid
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_every_alert_has_a_duration_a_description_and_its_dashboard_threshold():
    groups = yaml.safe_load(generate.RULES_PATH.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == {alert.name for alert in generate.ALERTS}
    for rule in rules:
        assert rule["for"] and rule["annotations"]["description"] and rule["labels"]["severity"]
    board = generate.dashboard()
    limits = {panel["title"]: panel["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] for panel in board["panels"] if panel["type"] == "timeseries"}
    by_metric = {alert.measure: alert.limit for alert in generate.ALERTS}
    assert limits["OOD score PSI"] == by_metric["ncguard_drift_score_psi"]
    assert limits["OOD score KS distance"] == by_metric["ncguard_drift_score_ks"]
    assert limits["Predicted class JS distance"] == by_metric["ncguard_drift_class_js"]
    assert limits["Transfer feature mean shift"] == by_metric["ncguard_drift_feature_mean_shift"]
