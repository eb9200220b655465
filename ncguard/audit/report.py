"""report.html: one self-contained file (plots as inline base64 PNGs, no scripts, no links out), so it
opens offline, from a mail attachment or an artifact store, exactly as written."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from ..atomic import atomic_write
from ..model_file import ModelMetadata
from .partial import PartialStats

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;background:#fff}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.alert{background:#fde2e2;font-weight:bold}.ok{background:#e6f4e6}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.5em}.thumbs{display:flex;flex-wrap:wrap;gap:.6em}
.thumb{border:1px solid #ccc;padding:.3em;font-size:.75em;width:120px;word-break:break-all}
.thumb img{width:112px;height:112px;image-rendering:pixelated;display:block}
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _class_plot(summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["per_class"]
    names = [r["class"] for r in rows]
    predicted = [r["predicted_ood_rate"] or 0.0 for r in rows]
    labelled = [r["labelled_ood_rate"] for r in rows]
    figure, axis = plt.subplots(figsize=(8, 3.2))
    positions = np.arange(len(names))
    width = 0.4 if any(v is not None for v in labelled) else 0.8
    axis.bar(positions - (width / 2 if width < 0.8 else 0), predicted, width, label="by predicted class", color="#4878a8")
    if width < 0.8:
        axis.bar(positions + width / 2, [v or 0.0 for v in labelled], width, label="by true label", color="#e0a040")
    axis.axhline(summary["model"]["expected_ood_rate"], color="k", linestyle="--", linewidth=1, label="expected (1 - TPR)")
    axis.set_xticks(positions, names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right" if max(map(len, names)) > 3 else "center")
    axis.set_ylabel("OOD rate")
    axis.legend(fontsize=8)
    axis.set_title("OOD rate per class")
    return _png(figure)


def _histogram_plot(summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histogram = summary["score_histogram"]
    counts = np.asarray(histogram["counts"], dtype=np.float64)
    share = counts / counts.sum() if counts.sum() else counts
    reference = np.asarray(histogram["reference_mass"])
    labels = [f"<={b:.3g}" if not isinstance(b, str) else ">" + f"{histogram['upper_bounds'][-2]:.3g}" for b in histogram["upper_bounds"]]
    figure, axis = plt.subplots(figsize=(9, 3.4))
    positions = np.arange(len(labels))
    axis.bar(positions - 0.2, reference, 0.4, label="in-distribution reference", color="#9a9a9a")
    axis.bar(positions + 0.2, share, 0.4, label="audited rows", color="#c04040")
    threshold = summary["model"]["threshold"]
    bounds = histogram["upper_bounds"][:-1]
    if bounds:  # the threshold is one of the bounds, rounded to 6 significant digits
        nearest = int(np.argmin(np.abs(np.asarray(bounds, dtype=np.float64) - threshold)))
        axis.axvline(nearest + 0.5, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    axis.set_xticks(positions, labels, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("share of rows")
    axis.set_title("OOD score histogram (the service's buckets)")
    axis.legend(fontsize=8)
    return _png(figure)


def _time_plot(summary: dict) -> str | None:
    buckets = summary["time_buckets"]
    if len(buckets) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 3))
    axis.plot([b["bucket"] for b in buckets], [b["ood_rate"] for b in buckets], marker="o", color="#c04040")
    axis.axhline(summary["model"]["expected_ood_rate"], color="k", linestyle="--", linewidth=1)
    axis.set_ylabel("OOD rate")
    axis.set_title("OOD rate per time bucket")
    axis.tick_params(axis="x", labelrotation=45, labelsize=7)
    return _png(figure)


def _drift_rows(drift_table: dict) -> str:
    names = {
        "ood_rate": "OOD rate (vs expected 1 - TPR + margin)",
        "score_psi": "OOD score PSI",
        "score_ks": "OOD score KS",
        "class_js": "predicted class mix, Jensen-Shannon",
        "feature_mean_shift": "feature mean shift (reference std)",
    }
    out = []
    for key, label in names.items():
        if key not in drift_table:
            continue
        entry = drift_table[key]
        value = _fmt(entry["value"])
        if key == "score_ks":
            value += f" (at most {_fmt(entry['upper_bound'])})"
        css = "alert" if entry["alert"] else "ok"
        out.append(f"<tr class='{css}'><td>{label}</td><td>{value}</td><td>{_fmt(entry['limit'])}</td><td>{'ALERT' if entry['alert'] else 'ok'}</td></tr>")
    return "\n".join(out)


def render_report(summary: dict, total: PartialStats, meta: ModelMetadata) -> str:
    model = summary["model"]
    run = summary["run"]
    e = html.escape
    cards = [
        ("rows scored", summary["rows"]),
        ("OOD rate", _fmt(summary["ood_rate"])),
        ("expected", _fmt(model["expected_ood_rate"])),
        ("accuracy", _fmt(summary["accuracy"]) if summary["accuracy"] is not None else "no labels"),
        ("rejected rows", sum(summary["rejected"].values())),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>ncguard audit: {e(model['name'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>ncguard audit of {e(model['name'])}</h1>",
        f"<p>Score <b>{e(model['score'])}</b>, threshold {model['threshold']:.4g} (TPR {model['tpr']:.2f}); "
        f"engine {e(str(run['engine']))}, {run['shards_scored']} shards scored, {run['shards_resumed']} resumed, "
        f"{run['seconds']:.1f} s.</p>",
        "<div class='cards'>" + "".join(f"<div class='card'>{e(k)}<b>{v}</b></div>" for k, v in cards) + "</div>",
        "<h2>Drift against the reference stored in the model</h2>",
        "<p>The distances of the service's drift gauges, over every audited row; limits are the alert thresholds of its Prometheus rules.</p>",
        "<table><tr><th>distance</th><th>value</th><th>alert above</th><th></th></tr>", _drift_rows(summary["drift"]), "</table>",
        "<h2>OOD score histogram</h2>", _img(_histogram_plot(summary), "score histogram"),
        "<h2>Per class</h2>", _img(_class_plot(summary), "OOD rate per class"),
        "<table><tr><th>class</th><th>predicted</th><th>OOD rate</th><th>labelled</th><th>OOD rate</th><th>accuracy</th></tr>",
    ]
    for row in summary["per_class"]:
        parts.append(
            f"<tr><td>{e(row['class'])}</td><td>{row['predicted']}</td><td>{_fmt(row['predicted_ood_rate'])}</td>"
            f"<td>{row['labelled']}</td><td>{_fmt(row['labelled_ood_rate'])}</td><td>{_fmt(row['accuracy'])}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Sources</h2><table><tr><th>source</th><th>rows</th><th>rejected</th><th>OOD rate</th><th>accuracy</th><th>PSI</th><th>KS</th></tr>")
    for source in summary["sources"]:
        d = source["drift"]
        parts.append(
            f"<tr><td>{e(source['source'])}</td><td>{source['rows']}</td><td>{sum(source['rejected'].values())}</td>"
            f"<td>{_fmt(source['ood_rate'])}</td><td>{_fmt(source['accuracy'])}</td>"
            f"<td>{_fmt(d.get('score_psi', {}).get('value'))}</td><td>{_fmt(d.get('score_ks', {}).get('value'))}</td></tr>"
        )
    parts.append("</table>")
    time_plot = _time_plot(summary)
    if summary["time_buckets"]:
        parts.append("<h2>Per time bucket</h2>")
        if time_plot:
            parts.append(_img(time_plot, "OOD rate per time bucket"))
        parts.append("<table><tr><th>bucket</th><th>rows</th><th>OOD rate</th><th>accuracy</th></tr>")
        for b in summary["time_buckets"]:
            parts.append(f"<tr><td>{e(b['bucket'])}</td><td>{b['rows']}</td><td>{_fmt(b['ood_rate'])}</td><td>{_fmt(b['accuracy'])}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Most out-of-distribution rows</h2>")
    if any("thumbnail" in entry for entry in total.top_):
        parts.append("<div class='thumbs'>")
        for entry in total.top_:
            image = _img(entry["thumbnail"], entry["row_id"]) if "thumbnail" in entry else ""
            label = f", label {e(str(entry['label']))}" if entry.get("label") is not None else ""
            parts.append(f"<div class='thumb'>{image}score {entry['ood_score']:.3g}<br>as {e(str(entry['predicted']))}{label}<br>{e(entry['row_id'])}</div>")
        parts.append("</div>")
    else:
        parts.append("<table><tr><th>row</th><th>OOD score</th><th>predicted</th><th>label</th></tr>")
        for entry in total.top_:
            parts.append(f"<tr><td>{e(entry['row_id'])}</td><td>{entry['ood_score']:.4g}</td><td>{e(str(entry['predicted']))}</td><td>{_fmt(entry.get('label'))}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(path, summary: dict, total: PartialStats, meta: ModelMetadata):
    return atomic_write(path, render_report(summary, total, meta))
