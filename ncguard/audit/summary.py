"""summary.json: the merged partial statistics read out as rates, per-class tables and drift distances."""

from __future__ import annotations

import numpy as np

from .. import __version__, drift
from ..model_file import ModelMetadata
from .partial import PartialStats


def _rate(numerator, denominator):
    return float(numerator) / float(denominator) if denominator else None


def drift_table(partial: PartialStats, meta: ModelMetadata) -> dict:
    """Each drift distance against the alert limit the service's rules use (ncguard.drift)."""
    distances = partial.distances(meta)
    table = {}
    for name, limit in drift.DRIFT_LIMITS.items():
        if name in distances:
            table[name] = {"value": distances[name], "limit": limit, "alert": bool(distances[name] > limit)}
    if "score_ks" in table:
        table["score_ks"]["upper_bound"] = distances["score_ks_upper"]
    if "ood_rate" in distances:
        expected = 1.0 - meta.tpr
        table["ood_rate"] = {
            "value": distances["ood_rate"], "expected": expected, "limit": expected + drift.OOD_RATE_MARGIN,
            "alert": bool(distances["ood_rate"] - expected > drift.OOD_RATE_MARGIN),
        }
    return table


def reference_bucket_mass(bounds, score_quantiles) -> list[float]:
    """Share of in-distribution scores in each dashboard bucket, from the reference CDF."""
    reference = drift._ReferenceCDF(score_quantiles)
    return np.diff(np.concatenate([[0.0], reference.value(np.asarray(bounds, dtype=np.float64)), [1.0]])).tolist()


def _overview(partial: PartialStats, meta: ModelMetadata) -> dict:
    return {
        "rows": partial.rows_,
        "rejected": dict(sorted(partial.rejected_.items())),
        "ood": partial.ood_,
        "ood_rate": _rate(partial.ood_, partial.rows_),
        "labelled": partial.labelled_,
        "accuracy": _rate(partial.correct_, partial.labelled_),
        "mean_ood_score": _rate(partial.score_sum_, partial.rows_),
        "drift": drift_table(partial, meta),
    }


def build_summary(meta: ModelMetadata, total: PartialStats, per_source: list[PartialStats], sources: list[str], run: dict) -> dict:
    classes = list(meta.classes)
    per_class = []
    for c, name in enumerate(classes):
        per_class.append({
            "class": name,
            "predicted": int(total.predicted_[c]),
            "predicted_ood_rate": _rate(total.predicted_ood_[c], total.predicted_[c]),
            "labelled": int(total.label_[c]),
            "labelled_ood_rate": _rate(total.label_ood_[c], total.label_[c]),
            "accuracy": _rate(total.label_correct_[c], total.label_[c]),
        })
    bounds = total.binning.buckets.tolist()
    summary = {
        "ncguard_version": __version__,
        "model": {
            "name": meta.name, "version": meta.version, "score": meta.score, "threshold": meta.threshold,
            "tpr": meta.tpr, "expected_ood_rate": 1.0 - meta.tpr, "classes": classes,
        },
        "run": run,
        **_overview(total, meta),
        "per_class": per_class,
        "score_histogram": {
            "upper_bounds": bounds + ["+Inf"],
            "counts": total.buckets_.tolist(),
            "reference_mass": reference_bucket_mass(bounds, meta.drift_reference.score_quantiles),
        },
        "sources": [{"source": spec, **_overview(partial, meta)} for spec, partial in zip(sources, per_source)],
        "time_buckets": [
            {"bucket": name, "rows": v[0], "ood_rate": _rate(v[1], v[0]), "labelled": v[2], "accuracy": _rate(v[3], v[2])}
            for name, v in sorted(total.time_.items())
        ],
        "most_ood": [{k: v for k, v in entry.items() if k != "thumbnail"} for entry in total.top_],
    }
    return summary
