"""The service's drift metrics seen through a real Prometheus (Debian's `prometheus` package).

One scenario per module: the trained digits model served by 2 workers on 127.0.0.1, a Prometheus
scraping it every second with the checked-in alert rules, held-out digits first and inverted
digits after. Everything is read back through Prometheus's HTTP query API, as Grafana would.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from ncguard.client import free_port, local_server
from ncguard.data import load_digits
from ncguard.model_file import load_model
from serving.dashboards import generate

PROMETHEUS_HINT = "Debian's prometheus package is not installed: run `make system-deps` as root, or `apt-get install prometheus`"
WORKERS = 2
# Each phase sends the 450 held-out digits twice in a shuffled order, and each worker keeps a window
# of 400: a worker serves about half of a phase, so its window covers most distinct digits. With
# one pass and windows of 200, the sampling noise of half the held-out set against a reference of
# 135 calibration scores put the larger worker's PSI over its alert threshold in ~0.3% of splits.
PASSES = 2
WINDOW, MIN_SAMPLES = 400, 200
REQUEST_SIZE = 10
WAIT_SECONDS = 60.0  # most a query may take to reflect the traffic (scrapes run every second)

# Gauges read after each phase (largest over the workers, as the dashboard shows them), with the
# alert threshold each must stay under on held-out digits and exceed on inverted ones.
DRIFT_GAUGES = {
    "ncguard_drift_score_psi": generate.PSI_LIMIT,
    "ncguard_drift_score_ks": generate.KS_LIMIT,
    "ncguard_drift_class_js": generate.JS_LIMIT,
    "ncguard_drift_feature_mean_shift": generate.FEATURE_SHIFT_LIMIT,
}
DRIFT_ALERTS = {"NcguardOODRateHigh", "NcguardScorePSIHigh", "NcguardScoreKSHigh", "NcguardClassMixDrift", "NcguardFeatureShift"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(PROMETHEUS_HINT)
    return path


class Prometheus:
    """A Prometheus server on a free loopback port with its data in a temporary folder."""

    def __init__(self, url: str, process: subprocess.Popen):
        self.url = url
        self.process = process
        self.http = httpx.Client(base_url=url, timeout=10.0)

    def query(self, expr: str) -> list[dict]:
        response = self.http.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} should give one series, got {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, accept, what: str):
        """Poll `expr` until `accept(value)` holds; fail with the last value after WAIT_SECONDS."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            value = self.value(expr)
            if value is not None and accept(value):
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not show {what} within {WAIT_SECONDS:.0f} s: {expr} = {value}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def scrape_config(target: str, rules_path: Path) -> dict:
    """The checked-in scrape config, pointed at `target`, scraping and evaluating rules every second."""
    config = yaml.safe_load(generate.SCRAPE_CONFIG_PATH.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules_path)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


def start_prometheus(config_path: Path, data_dir: Path, log_path: Path) -> Prometheus:
    port = free_port()
    command = [
        _tool("prometheus"),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 30
    while True:
        try:
            if prometheus.http.get("/-/ready").status_code == 200:
                return prometheus
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            prometheus.stop()
            pytest.fail(f"Prometheus did not start; its log:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def send(url: str, x: np.ndarray) -> dict:
    """POST x in requests of REQUEST_SIZE from 4 threads, each on a fresh connection, so both workers serve."""

    def post(rows: np.ndarray) -> list[dict]:
        response = httpx.post(f"{url}/predict", json={"inputs": rows.tolist()}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    chunks = [x[i : i + REQUEST_SIZE] for i in range(0, len(x), REQUEST_SIZE)]
    with ThreadPoolExecutor(4) as pool:
        rows = [row for answer in pool.map(post, chunks) for row in answer]
    return {"requests": len(chunks), "inputs": len(rows), "ood": sum(row["is_ood"] for row in rows)}


def shifted(x: np.ndarray) -> np.ndarray:
    """Inverted digits: dark strokes on a light ground, pixels still in [0, 1]."""
    return (1.0 - x).astype(np.float32)


def readings(prometheus: Prometheus, model: str) -> dict[str, float]:
    names = ["ncguard_ood_rate", *DRIFT_GAUGES]
    return {name: prometheus.value(f'max by (model) ({name}{{model="{model}"}})') for name in names}


def firing_or_pending(prometheus: Prometheus) -> set[str]:
    return {series["metric"]["alertname"] for series in prometheus.query("ALERTS")}


@pytest.fixture(scope="module")
def scenario(digits_model_path, tmp_path_factory):
    """Serve, scrape, send held-out then inverted digits; what Prometheus showed after each phase."""
    _tool("prometheus")
    work = tmp_path_factory.mktemp("monitoring")
    model = load_model(digits_model_path).metadata
    env = {
        "BENTOML_HOME": str(work / "bentoml-home"),
        "NCGUARD_DRIFT_WINDOW": str(WINDOW),
        "NCGUARD_DRIFT_MIN_SAMPLES": str(MIN_SAMPLES),
    }
    held_out = load_digits("test").x
    traffic = held_out[np.random.default_rng(0).permutation(np.tile(np.arange(len(held_out)), PASSES))]
    with local_server(digits_model_path, workers=WORKERS, env=env, ready_timeout=120, log_path=work / "serve.log") as client:
        target = client.url.removeprefix("http://")
        config_path = work / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(scrape_config(target, generate.RULES_PATH)))
        prometheus = start_prometheus(config_path, work / "prometheus-data", work / "prometheus.log")
        try:
            prometheus.wait_for(f'up{{job="ncguard",instance="{target}"}}', lambda v: v == 1, "the service up")
            total = f'sum(ncguard_predictions_total{{model="{model.name}"}})'

            sent_id = send(client.url, traffic)
            prometheus.wait_for(total, lambda v: v == sent_id["inputs"], "every held-out prediction")
            time.sleep(3)  # a few rule evaluations on the held-out window
            before = readings(prometheus, model.name)
            alerts_before = firing_or_pending(prometheus)

            sent_shifted = send(client.url, shifted(traffic))
            prometheus.wait_for(total, lambda v: v == sent_id["inputs"] + sent_shifted["inputs"], "every inverted prediction")
            prometheus.wait_for("count(ALERTS)", lambda v: v >= len(DRIFT_ALERTS), "the drift alerts pending")
            yield {
                "prometheus": prometheus,
                "model": model,
                "target": target,
                "sent": [sent_id, sent_shifted],
                "before": before,
                "after": readings(prometheus, model.name),
                "alerts_before": alerts_before,
                "alerts_after": firing_or_pending(prometheus),
            }
        finally:
            prometheus.stop()


def test_ood_rate_and_drift_gauges_stay_low_on_held_out_data_and_rise_on_inverted_data(scenario):
    before, after = scenario["before"], scenario["after"]
    expected = 1.0 - scenario["model"].tpr
    assert before["ncguard_ood_rate"] < expected + generate.OOD_RATE_MARGIN, before
    assert after["ncguard_ood_rate"] > 0.5, after
    for name, limit in DRIFT_GAUGES.items():
        assert before[name] < limit, (name, before)
        assert after[name] > limit, (name, after)
        assert after[name] > 2 * before[name], (name, before, after)


def test_drift_alerts_go_pending_only_after_the_shift(scenario):
    assert not scenario["alerts_before"] & DRIFT_ALERTS, scenario["alerts_before"]
    assert DRIFT_ALERTS <= scenario["alerts_after"], scenario["alerts_after"]
    assert "NcguardServerErrors" not in scenario["alerts_after"]


def test_counters_add_up_over_both_workers(scenario):
    prometheus, model = scenario["prometheus"], scenario["model"].name
    sent_id, sent_shifted = scenario["sent"]
    inputs = sent_id["inputs"] + sent_shifted["inputs"]
    assert prometheus.value(f'sum(ncguard_predictions_total{{model="{model}"}})') == inputs
    assert prometheus.value(f'sum(ncguard_ood_total{{model="{model}"}})') == sent_id["ood"] + sent_shifted["ood"]
    assert prometheus.value(f'sum(ncguard_ood_score_count{{model="{model}"}})') == inputs
    requests = sent_id["requests"] + sent_shifted["requests"]
    assert prometheus.value(f'sum({generate.HTTP_REQUESTS}{{endpoint="/predict",http_response_code="200"}})') == requests
    # both workers served: each publishes its own window fill, and each window is full
    fills = prometheus.query(f'ncguard_drift_window_samples{{model="{model}"}}')
    assert len({series["metric"]["pid"] for series in fills}) == WORKERS, fills
    assert all(float(series["value"][1]) == WINDOW for series in fills), fills


def test_model_info_and_expected_ood_rate_are_exported(scenario):
    prometheus, model = scenario["prometheus"], scenario["model"]
    (info,) = prometheus.query(f'ncguard_model_info{{model="{model.name}"}}')
    assert info["metric"]["version"] == model.version
    assert info["metric"]["score"] == model.score
    assert float(info["metric"]["threshold"]) == model.threshold
    assert prometheus.value(f'ncguard_ood_rate_expected{{model="{model.name}"}}') == pytest.approx(1.0 - model.tpr)


def _grafana_to_promql(expr: str, model: str, instance: str) -> str:
    """What Grafana sends for one selected model and instance (both match themselves as regexes)."""
    return expr.replace("$model", model).replace("$instance", instance).replace("$__rate_interval", "1m")


def test_every_dashboard_query_returns_data(scenario):
    prometheus, model, target = scenario["prometheus"], scenario["model"].name, scenario["target"]
    board = json.loads(generate.DASHBOARD_PATH.read_text())
    queries = generate.dashboard_queries(board)
    assert len(queries) >= 15
    for expr in queries:
        assert prometheus.query(_grafana_to_promql(expr, model, target)), f"no data for dashboard query {expr}"
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        series = prometheus.query(_grafana_to_promql(match.group(1), model, target))
        assert {s["metric"].get(match.group(2)) for s in series} >= {model if variable["name"] == "model" else target}


def test_every_alert_expression_and_its_measure_return_data(scenario):
    prometheus = scenario["prometheus"]
    groups = yaml.safe_load(generate.RULES_PATH.read_text())["groups"]
    exprs = {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}
    for alert in generate.ALERTS:
        assert exprs[alert.name] == alert.expr
        assert prometheus.query(alert.measure), f"no data for the measure of {alert.name}: {alert.measure}"
        if alert.name in DRIFT_ALERTS:  # after the shift, these conditions hold
            assert prometheus.query(alert.expr), f"{alert.name} does not hold after the shift"


def test_promtool_accepts_the_checked_in_config_and_rules(tmp_path):
    promtool = _tool("promtool")
    for args in (["check", "config", str(generate.SCRAPE_CONFIG_PATH)], ["check", "rules", str(generate.RULES_PATH)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    # and the config the test scenario derives from it
    derived = tmp_path / "prometheus.yml"
    derived.write_text(yaml.safe_dump(scrape_config("127.0.0.1:3000", generate.RULES_PATH)))
    result = subprocess.run([promtool, "check", "config", str(derived)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_a_server_with_api_keys_given_the_key(digits_model_path, tmp_path):
    """/metrics is behind the key: Prometheus with `authorization.credentials_file` scrapes it, without it gets 401."""
    import secrets

    _tool("prometheus")
    key = secrets.token_urlsafe(24)
    key_file = tmp_path / "ncguard-api-key"
    key_file.write_text(key + "\n")
    env = {"BENTOML_HOME": str(tmp_path / "bentoml-home"), "NCGUARD_API_KEYS": key}
    with local_server(digits_model_path, env=env, ready_timeout=120, api_key=key) as client:
        target = client.url.removeprefix("http://")
        config = scrape_config(target, generate.RULES_PATH)
        keyed = dict(config["scrape_configs"][0], authorization={"credentials_file": str(key_file)})
        anonymous = dict(config["scrape_configs"][0], job_name="anonymous")
        config["scrape_configs"] = [keyed, anonymous]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        prometheus = start_prometheus(config_path, tmp_path / "data", tmp_path / "prometheus.log")
        try:
            prometheus.wait_for(f'up{{job="ncguard",instance="{target}"}}', lambda v: v == 1, "the keyed scrape up")
            prometheus.wait_for(f'up{{job="anonymous",instance="{target}"}}', lambda v: v == 0, "the scrape without a key refused")
            prometheus.wait_for(f'count(ncguard_model_info{{job="ncguard"}})', lambda v: v == 1, "the model's metrics scraped with the key")
        finally:
            prometheus.stop()
