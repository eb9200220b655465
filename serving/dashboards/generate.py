"""The Grafana dashboard and the Prometheus alert rules, written from one list of queries.

    python -m serving.dashboards.generate     # rewrites ncguard-dashboard.json and alerts.yml here

The alert thresholds and the dashboard's threshold lines come from the same constants, and the
tests run every query below against a real Prometheus scraping the real service, so a renamed
metric fails a test instead of leaving an empty panel. The two files are checked in (Grafana and
Prometheus read them without Python); a test checks that they match this module.

Written by hand rather than with a library: grafanalib has had no release since January 2024
(its maintainer, Weaveworks, has closed), and grafana-foundation-sdk ships one epoch-versioned
build per Grafana minor version, so a plain `pip install` picks an arbitrary schema. What a
dashboard needs here is a few fields per panel, and Grafana migrates older dashboard JSON itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ncguard.atomic import atomic_write

HERE = Path(__file__).resolve().parent
DASHBOARD_PATH = HERE / "ncguard-dashboard.json"
RULES_PATH = HERE / "alerts.yml"
SCRAPE_CONFIG_PATH = HERE / "prometheus.yml"

# ----------------------------------------------------------------------------- thresholds
# Measured on the digits test model (15 epochs, etf score): per-worker windows of 200 held-out
# digits read, at the 99th percentile over random splits between 2 workers, PSI 0.19, KS 0.13,
# JS 0.11 and a feature mean shift of 0.08 std (the reference there rests on only 135 calibration
# scores; larger references and the default window of 1000 read lower). Inverted, rotated or
# noisy digits read PSI 3.5-7, KS 0.7-0.9, JS 0.3-0.7 and a feature shift of 0.3-0.5 std.
# The `for:` durations ask for a shift that lasts, not one bad minute.
# The limits themselves live in the core (ncguard.drift), shared with `ncguard audit`'s report.
from ncguard.drift import FEATURE_SHIFT_LIMIT, JS_LIMIT, KS_LIMIT, OOD_RATE_MARGIN, PSI_LIMIT  # noqa: E402
ERROR_RATIO_LIMIT = 0.05  # 5xx answers among prediction requests
REJECTED_RATIO_LIMIT = 0.25  # 4xx refusals among prediction requests

# The service's HTTP metrics (serving.metrics.ServiceMetrics; BentoML's own are switched off because
# they label unknown paths with the raw path). Same label names as BentoML's; panels and rules
# select the service by the Prometheus `instance`.
HTTP_REQUESTS = "ncguard_http_requests_total"
HTTP_DURATION = "ncguard_http_request_duration_seconds_bucket"
SHED_REQUESTS = "ncguard_shed_requests_total"
PREDICT_ENDPOINTS = 'endpoint=~"/predict|/predict_image"'

# Grafana template variables; tests put real values in their place before running a query.
MODEL = 'model=~"$model"'
INSTANCE = 'instance=~"$instance"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | heatmap | table
    limit: float | None = None  # drawn as a red threshold line (the alert's threshold)
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Alert:
    name: str
    measure: str  # PromQL of the quantity; the rule fires while it stays above `limit` for `duration`
    limit: float
    duration: str
    severity: str
    summary: str
    description: str
    labels: dict = field(default_factory=dict)

    @property
    def expr(self) -> str:
        return f"{self.measure} > {self.limit:g}"


def _ratio_of_requests(codes: str, window: str, selector: str = "") -> str:
    """Share of prediction requests answered with `codes` (a regex); 0, not absent, when there are none."""
    base = f"{HTTP_REQUESTS}{{{PREDICT_ENDPOINTS}{selector}}}"
    matching = f'{HTTP_REQUESTS}{{{PREDICT_ENDPOINTS},http_response_code=~"{codes}"{selector}}}'
    total = f"sum by (job, instance) (rate({base}[{window}]))"
    return f"(sum by (job, instance) (rate({matching}[{window}])) or {total} * 0)\n/ {total}"


def _drift_panel(title: str, metric: str, description: str, limit: float, unit: str = "short") -> Panel:
    return Panel(title, description, (Query(f"max by (model) ({metric}{{{MODEL}}})", "{{model}}"),), unit=unit, limit=limit)


ROWS = (
    Row(
        "Traffic",
        (
            Panel(
                "Request rate",
                "Prediction requests per second, by endpoint and HTTP status.",
                (
                    Query(
                        f"sum by (endpoint, http_response_code) (rate({HTTP_REQUESTS}{{{PREDICT_ENDPOINTS},{INSTANCE}}}[{RATE}]))",
                        "{{endpoint}} {{http_response_code}}",
                    ),
                ),
                unit="reqps",
                width=8,
            ),
            Panel(
                "Latency",
                "Prediction request latency quantiles, from the service's duration histogram.",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (le) (rate({HTTP_DURATION}{{{PREDICT_ENDPOINTS},{INSTANCE}}}[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ),
                unit="s",
                width=8,
            ),
            Panel(
                "Errors and refusals",
                "Share of prediction requests answered 5xx (the service failed) and 4xx (input refused), and refusals by reason.",
                (
                    Query(_ratio_of_requests("5..", RATE, f",{INSTANCE}"), "5xx share"),
                    Query(_ratio_of_requests("4..", RATE, f",{INSTANCE}"), "4xx share"),
                    Query(f"sum by (reason) (rate(ncguard_rejected_inputs_total{{{MODEL}}}[{RATE}]))", "refused/s: {{reason}}"),
                    Query(f"sum (rate({SHED_REQUESTS}{{{MODEL}}}[{RATE}]))", "shed/s (503, overloaded)"),
                ),
                unit="short",
                width=8,
            ),
        ),
    ),
    Row(
        "Out-of-distribution inputs",
        (
            Panel(
                "OOD rate",
                "Share of OOD-flagged inputs in the rolling window (largest over the workers), against the "
                "rate expected on in-distribution data (1 - TPR), and the same share over the last interval from the counters.",
                (
                    Query(f"max by (model) (ncguard_ood_rate{{{MODEL}}})", "window {{model}}"),
                    Query(f"max by (model) (ncguard_ood_rate_expected{{{MODEL}}})", "expected {{model}}"),
                    Query(
                        f"sum by (model) (rate(ncguard_ood_total{{{MODEL}}}[{RATE}])) / sum by (model) (rate(ncguard_predictions_total{{{MODEL}}}[{RATE}]))",
                        "interval {{model}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "OOD decisions by driving component",
                "OOD-flagged inputs per second by the part of the score that drove the decision: for the default model, a conv "
                "block (block3) means the input looks different at the pixel or shape level, the detection layer that it looks like no known class.",
                (Query(f"sum by (component) (rate(ncguard_ood_decisions_total{{{MODEL}}}[{RATE}]))", "{{component}}"),),
                unit="reqps",
            ),
            Panel(
                "OOD score distribution",
                "Served OOD scores per histogram bucket; buckets sit at the model's in-distribution score quantiles, "
                "then at its threshold and above the largest in-distribution score.",
                (Query(f"sum by (le) (increase(ncguard_ood_score_bucket{{{MODEL}}}[{RATE}]))", "{{le}}"),),
                kind="heatmap",
            ),
            Panel(
                "OOD score quantiles",
                "Median and 95th percentile of served OOD scores (from the histogram).",
                tuple(
                    Query(f"histogram_quantile({q}, sum by (le, model) (rate(ncguard_ood_score_bucket{{{MODEL}}}[{RATE}])))", f"p{round(q * 100)} {{{{model}}}}")
                    for q in (0.5, 0.95)
                ),
            ),
            Panel(
                "Served model",
                "Version, OOD score and threshold of the model each instance serves.",
                (Query(f"max by (instance, model, version, score, threshold) (ncguard_model_info{{{MODEL}}})"),),
                kind="table",
            ),
        ),
    ),
    Row(
        "Drift against the training reference",
        (
            _drift_panel(
                "OOD score PSI",
                "ncguard_drift_score_psi",
                "Population stability index of the window's OOD scores against the in-distribution reference (decile bins).",
                PSI_LIMIT,
            ),
            _drift_panel(
                "OOD score KS distance",
                "ncguard_drift_score_ks",
                "Kolmogorov-Smirnov distance between the window's OOD scores and the reference distribution.",
                KS_LIMIT,
            ),
            _drift_panel(
                "Predicted class JS distance",
                "ncguard_drift_class_js",
                "Jensen-Shannon distance (base 2) between the window's predicted classes and the training class priors.",
                JS_LIMIT,
            ),
            _drift_panel(
                "Transfer feature mean shift",
                "ncguard_drift_feature_mean_shift",
                "Mean over transfer features of |window mean - reference mean| in reference standard deviations.",
                FEATURE_SHIFT_LIMIT,
            ),
        ),
    ),
    Row(
        "Predictions",
        (
            Panel(
                "Predictions by label",
                "Predictions per second, by predicted label.",
                (Query(f"sum by (label) (rate(ncguard_predictions_total{{{MODEL}}}[{RATE}]))", "{{label}}"),),
                unit="ops",
            ),
            Panel(
                "Drift window fill",
                "Predictions in each worker's drift window; the gauges appear once a window holds enough of them.",
                (Query(f"sum by (instance, pid) (ncguard_drift_window_samples{{{MODEL}}})", "{{instance}} pid {{pid}}"),),
            ),
        ),
    ),
)


ALERTS = (
    Alert(
        "NcguardOODRateHigh",
        "ncguard_ood_rate - ncguard_ood_rate_expected",
        OOD_RATE_MARGIN,
        "10m",
        "warning",
        "More inputs flagged out-of-distribution than the threshold lets through on in-distribution data",
        "{{ $labels.model }} on {{ $labels.instance }}: the OOD rate of the rolling window is {{ $value | humanizePercentage }} "
        f"above the expected 1 - TPR (alert margin {OOD_RATE_MARGIN:g}). Traffic has moved away from the training data, or a client sends something else.",
    ),
    Alert(
        "NcguardScorePSIHigh",
        "ncguard_drift_score_psi",
        PSI_LIMIT,
        "15m",
        "warning",
        "OOD score distribution drifted from the reference (PSI)",
        "{{ $labels.model }} on {{ $labels.instance }}: population stability index {{ $value | printf \"%.3f\" }} of the windowed OOD scores "
        f"against the in-distribution reference (> {PSI_LIMIT:g} means a shifted distribution).",
    ),
    Alert(
        "NcguardScoreKSHigh",
        "ncguard_drift_score_ks",
        KS_LIMIT,
        "15m",
        "warning",
        "OOD score distribution drifted from the reference (KS)",
        "{{ $labels.model }} on {{ $labels.instance }}: Kolmogorov-Smirnov distance {{ $value | printf \"%.3f\" }} between the windowed "
        f"OOD scores and the in-distribution reference (threshold {KS_LIMIT:g}).",
    ),
    Alert(
        "NcguardClassMixDrift",
        "ncguard_drift_class_js",
        JS_LIMIT,
        "30m",
        "warning",
        "Predicted class mix far from the training class priors",
        "{{ $labels.model }} on {{ $labels.instance }}: Jensen-Shannon distance {{ $value | printf \"%.3f\" }} between the windowed "
        f"predicted classes and the training priors (threshold {JS_LIMIT:g}). Either the class mix of the traffic changed or the model misreads it.",
    ),
    Alert(
        "NcguardFeatureShift",
        "ncguard_drift_feature_mean_shift",
        FEATURE_SHIFT_LIMIT,
        "15m",
        "warning",
        "Transfer features shifted from the training reference",
        "{{ $labels.model }} on {{ $labels.instance }}: the windowed transfer features are on average {{ $value | printf \"%.2f\" }} "
        f"reference standard deviations from their training mean (threshold {FEATURE_SHIFT_LIMIT:g}): covariate shift.",
    ),
    Alert(
        "NcguardServerErrors",
        _ratio_of_requests("5..", "5m"),
        ERROR_RATIO_LIMIT,
        "5m",
        "critical",
        "The ncguard service fails prediction requests",
        "{{ $labels.instance }}: {{ $value | humanizePercentage }} of prediction requests got a 5xx answer over 5 minutes "
        f"(threshold {ERROR_RATIO_LIMIT:.0%}); see the service log.",
    ),
    Alert(
        "NcguardManyRefusals",
        _ratio_of_requests("4..", "15m"),
        REJECTED_RATIO_LIMIT,
        "15m",
        "info",
        "Many prediction requests refused as bad input",
        "{{ $labels.instance }}: {{ $value | humanizePercentage }} of prediction requests were refused with a 4xx over 15 minutes "
        f"(threshold {REJECTED_RATIO_LIMIT:.0%}); ncguard_rejected_inputs_total says why. A client is probably sending the wrong shape or format.",
    ),
    Alert(
        "NcguardDown",
        '1 - up{job="ncguard"}',
        0,
        "2m",
        "critical",
        "Prometheus cannot scrape the ncguard service",
        "{{ $labels.instance }} has not answered Prometheus's scrapes of /metrics for 2 minutes.",
    ),
)


# ----------------------------------------------------------------------------- Grafana JSON
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _target(query: Query, ref: str, kind: str) -> dict:
    target = {"datasource": DATASOURCE, "refId": ref, "expr": query.expr, "legendFormat": query.legend or "__auto", "range": kind != "table"}
    if kind == "heatmap":
        target["format"] = "heatmap"
    if kind == "table":
        target.update(format="table", instant=True)
    return target


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": panel.unit}
    if panel.kind == "timeseries":
        steps = [{"color": "green", "value": None}]
        if panel.limit is not None:
            steps.append({"color": "red", "value": panel.limit})
        defaults.update(
            min=0,
            thresholds={"mode": "absolute", "steps": steps},
            custom={"thresholdsStyle": {"mode": "line" if panel.limit is not None else "off"}, "lineWidth": 1, "fillOpacity": 10},
        )
    options = {
        "timeseries": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "none"}},
        "heatmap": {"calculate": False, "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64}, "yAxis": {"axisPlacement": "left"}},
        "table": {"showHeader": True},
    }[panel.kind]
    result = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [_target(q, chr(ord("A") + i), panel.kind) for i, q in enumerate(panel.queries)],
    }
    if panel.kind == "table":
        result["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]
    return result


def _template(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,  # on time range change
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict:
    """The Grafana dashboard as a dict (rows of panels laid out on Grafana's 24-column grid)."""
    panels, panel_id, y = [], 1, 0
    for row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id, x, row_height = panel_id + 1, x + panel.width, max(row_height, panel.height)
        y += row_height
    templates = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        _template("model", "Model", "label_values(ncguard_model_info, model)"),
        _template("instance", "Instance", 'label_values(ncguard_model_info{model=~"$model"}, instance)'),
    ]
    return {
        "uid": "ncguard-service",
        "title": "ncguard service",
        "description": "Traffic, OOD rate, OOD score distribution and drift distances of ncguard models served with BentoML.",
        "tags": ["ncguard", "bentoml", "drift"],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "annotations": {"list": []},
        "templating": {"list": templates},
        "panels": panels,
    }


def dashboard_queries(board: dict) -> list[str]:
    """Every PromQL expression of a dashboard's panels (its variables use Grafana's label_values)."""
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


# ----------------------------------------------------------------------------- Prometheus rules
def rules() -> dict:
    return {
        "groups": [
            {
                "name": "ncguard",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.duration,
                        "labels": {"severity": a.severity, **a.labels},
                        "annotations": {"summary": a.summary, "description": a.description},
                    }
                    for a in ALERTS
                ],
            }
        ]
    }


class _BlockStrings(yaml.SafeDumper):
    """Multi-line PromQL as YAML block scalars (`expr: |`), as people write rule files."""


_BlockStrings.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)
)

RULES_HEADER = "# Generated by `python -m serving.dashboards.generate` from serving/dashboards/generate.py; edit that, not this.\n"


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def rules_text() -> str:
    return RULES_HEADER + yaml.dump(rules(), Dumper=_BlockStrings, sort_keys=False, width=1000, allow_unicode=True)


def main() -> None:
    for path, text in ((DASHBOARD_PATH, dashboard_text()), (RULES_PATH, rules_text())):
        atomic_write(path, text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
