"""Mergeable partial statistics of an audit, and the drift distances computed from them.

Every shard is summarized by a `PartialStats` (counts, histograms, sums): adding two of them gives
the statistics of the union of their rows, in any order and on any machine. So the engines never
ship rows to the driver for the aggregates, and a resumed audit re-reads the partials of finished
shards instead of rescoring them.

The distances are those of the service's drift gauges (ncguard.drift, as serving/monitor.py uses
them), so an audit and the live dashboard agree on the same data:
- the class-mix Jensen-Shannon distance and the feature mean shift are functions of the class
  counts and the feature sums: exact (up to float summation order);
- PSI counts scores in bins cut by the reference quantiles. Those cuts are edges of the fine score
  histogram kept here, so the counts per PSI bin, hence the PSI, are exact (`psi_from_counts`
  mirrors ncguard.drift.psi on those counts; a test pins the two together);
- KS, sup |F_window - F_ref|, needs the window's CDF between data points, which no fixed-size
  summary holds. The fine histogram (about FINE_BINS bins of equal reference mass inside the
  reference range, plus the PSI cuts, the reference knots and the dashboard buckets) gives the
  window CDF exactly at its edges, so `ks_bounds` returns the largest gap at the edges (a lower
  bound, reported as score_ks) and an upper bound from the monotonicity of both CDFs inside each
  bin. The exact value lies between them; the width is at most the largest window or reference
  mass of one fine bin (about 1/FINE_BINS for the reference; for the window, what one bin holds).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import numpy as np

from .. import drift
from ..model_file import ModelMetadata

FINE_BINS = 4096
PSI_BINS = 10  # ncguard.drift.psi's default, which the service uses
TOP_K = 24  # most-OOD rows kept (with thumbnails for image inputs)
THUMBNAIL_PIXELS = 64

def psi_cuts(score_quantiles, n_bins: int = PSI_BINS) -> np.ndarray:
    """The bin cuts ncguard.drift.psi uses for these reference quantiles (same arithmetic)."""
    quantiles = np.asarray(score_quantiles, dtype=np.float64)
    if n_bins >= quantiles.size - 1:
        cuts = quantiles[1:-1]
    else:
        cuts = np.interp(np.linspace(0.0, 1.0, int(n_bins) + 1)[1:-1], np.linspace(0.0, 1.0, quantiles.size), quantiles)
    return np.unique(cuts)


@dataclass(frozen=True)
class Binning:
    """Everything a partial needs from the model, derived from its metadata alone (so every worker
    derives the same edges)."""

    n_classes: int
    feature_dim: int
    threshold: float
    buckets: np.ndarray  # dashboard histogram upper bounds; counts have one more bin (+Inf)
    fine_edges: np.ndarray  # fine histogram upper bounds (sorted, distinct)
    image_input: bool

    @classmethod
    def from_metadata(cls, meta: ModelMetadata, fine_bins: int = FINE_BINS) -> "Binning":
        quantiles = np.asarray(meta.drift_reference.score_quantiles, dtype=np.float64)
        buckets = np.asarray(drift.score_buckets(quantiles, meta.threshold))
        inner = np.interp(np.linspace(0.0, 1.0, fine_bins + 1), np.linspace(0.0, 1.0, quantiles.size), quantiles)
        fine = np.unique(np.concatenate([inner, quantiles, psi_cuts(quantiles), buckets, [meta.threshold]]))
        shape = list(meta.input_shape)
        return cls(
            n_classes=len(meta.classes),
            feature_dim=len(meta.drift_reference.feature_mean),
            threshold=float(meta.threshold),
            buckets=buckets,
            fine_edges=fine,
            image_input=len(shape) == 3 and shape[0] in (1, 3),
        )


def thumbnail_png(x: np.ndarray) -> str:
    """A base64 PNG of one image input [C, H, W] in [0, 1], at most THUMBNAIL_PIXELS on a side."""
    from PIL import Image

    pixels = np.clip(np.asarray(x, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))
    if max(image.size) > THUMBNAIL_PIXELS:
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_COUNT_FIELDS = (
    "predicted_", "predicted_ood_", "label_", "label_ood_", "label_correct_", "buckets_", "fine_",
)


class PartialStats:
    """Counts, histograms and sums over some rows of an audit; `merge` adds another's rows.

    Learned attributes (scikit-learn style, trailing underscore): rows_ (scored rows), ood_,
    rejected_ {reason: rows}, predicted_ / predicted_ood_ [C] by predicted class, labelled_,
    correct_, label_ / label_ood_ / label_correct_ [C] by true label, buckets_ (dashboard
    histogram), fine_ (fine histogram), feature_sum_ / feature_sumsq_ [D], score_sum_, time_
    {bucket: [rows, ood, labelled, correct]}, top_ (the TOP_K most OOD rows, highest first).
    """

    def __init__(self, binning: Binning, time_bucket: str = "day"):
        self.binning = binning
        self.time_bucket = time_bucket
        c, d = binning.n_classes, binning.feature_dim
        self.rows_ = 0
        self.ood_ = 0
        self.rejected_: dict[str, int] = {}
        self.predicted_ = np.zeros(c, np.int64)
        self.predicted_ood_ = np.zeros(c, np.int64)
        self.labelled_ = 0
        self.correct_ = 0
        self.label_ = np.zeros(c, np.int64)
        self.label_ood_ = np.zeros(c, np.int64)
        self.label_correct_ = np.zeros(c, np.int64)
        self.buckets_ = np.zeros(binning.buckets.size + 1, np.int64)
        self.fine_ = np.zeros(binning.fine_edges.size + 1, np.int64)
        self.feature_sum_ = np.zeros(d, np.float64)
        self.feature_sumsq_ = np.zeros(d, np.float64)
        self.score_sum_ = 0.0
        self.time_: dict[str, list[int]] = {}
        self.top_: list[dict] = []

    # ------------------------------------------------------------------------------ updating
    def partial_fit(self, class_index, ood_score, is_ood, features, labels, *, row_ids=(), inputs=None, timestamps=None, classes=()) -> "PartialStats":
        """Add scored rows (all finite). labels are class indices or -1 (unknown). Returns self."""
        class_index = np.asarray(class_index, dtype=np.int64)
        scores = np.asarray(ood_score, dtype=np.float64)
        is_ood = np.asarray(is_ood, dtype=bool)
        labels = np.asarray(labels, dtype=np.int64)
        c = self.binning.n_classes
        n = int(class_index.size)
        if n == 0:
            return self
        self.rows_ += n
        self.ood_ += int(is_ood.sum())
        self.predicted_ += np.bincount(class_index, minlength=c)
        self.predicted_ood_ += np.bincount(class_index[is_ood], minlength=c)
        known = labels >= 0
        correct = known & (labels == class_index)
        self.labelled_ += int(known.sum())
        self.correct_ += int(correct.sum())
        self.label_ += np.bincount(labels[known], minlength=c)
        self.label_ood_ += np.bincount(labels[known & is_ood], minlength=c)
        self.label_correct_ += np.bincount(labels[correct], minlength=c)
        # side="left": bin k holds edges[k-1] < s <= edges[k], the convention of drift.psi's bins
        self.buckets_ += np.bincount(np.searchsorted(self.binning.buckets, scores, side="left"), minlength=self.buckets_.size)
        self.fine_ += np.bincount(np.searchsorted(self.binning.fine_edges, scores, side="left"), minlength=self.fine_.size)
        features = np.asarray(features, dtype=np.float64)
        if features.ndim == 2 and features.shape[1] == self.feature_sum_.size:
            self.feature_sum_ += features.sum(axis=0)
            self.feature_sumsq_ += np.square(features).sum(axis=0)
        self.score_sum_ += float(scores.sum())
        if timestamps is not None:
            self._add_times(np.asarray(timestamps, dtype=np.int64), is_ood, known, correct)
        self._add_top(scores, class_index, labels, row_ids, inputs, classes)
        return self

    def reject(self, reason: str, rows: int = 1) -> "PartialStats":
        if rows:
            self.rejected_[reason] = self.rejected_.get(reason, 0) + int(rows)
        return self

    def _add_times(self, timestamps, is_ood, known, correct) -> None:
        unit = "D" if self.time_bucket == "day" else "h"
        buckets = timestamps.astype("datetime64[s]").astype(f"datetime64[{unit}]").astype(str)
        names, inverse = np.unique(buckets, return_inverse=True)
        for k, name in enumerate(names.tolist()):
            mask = inverse == k
            entry = self.time_.setdefault(name, [0, 0, 0, 0])
            entry[0] += int(mask.sum())
            entry[1] += int(is_ood[mask].sum())
            entry[2] += int(known[mask].sum())
            entry[3] += int(correct[mask].sum())

    def _add_top(self, scores, class_index, labels, row_ids, inputs, classes) -> None:
        if not len(row_ids):
            return
        k = min(TOP_K, scores.size)
        order = np.argsort(-scores, kind="stable")[:k]
        floor = self.top_[-1]["ood_score"] if len(self.top_) >= TOP_K else -np.inf
        fresh = {}
        for i in order.tolist():
            if scores[i] < floor:
                break
            fresh[str(row_ids[i])] = i
            self.top_.append({
                "row_id": str(row_ids[i]),
                "ood_score": float(scores[i]),
                "predicted": str(classes[class_index[i]]) if len(classes) else int(class_index[i]),
                "label": (str(classes[labels[i]]) if len(classes) else int(labels[i])) if labels[i] >= 0 else None,
            })
        self.top_ = _best(self.top_)
        if inputs is not None and self.binning.image_input:  # only for the rows that made it into the top
            for entry in self.top_:
                if entry["row_id"] in fresh and "thumbnail" not in entry:
                    entry["thumbnail"] = thumbnail_png(inputs[fresh[entry["row_id"]]])

    # ------------------------------------------------------------------------------ merging
    def merge(self, other: "PartialStats") -> "PartialStats":
        """Add another partial's rows to this one (commutative and associative). Returns self."""
        self.rows_ += other.rows_
        self.ood_ += other.ood_
        for reason, rows in other.rejected_.items():
            self.reject(reason, rows)
        for name in _COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.labelled_ += other.labelled_
        self.correct_ += other.correct_
        self.feature_sum_ = self.feature_sum_ + other.feature_sum_
        self.feature_sumsq_ = self.feature_sumsq_ + other.feature_sumsq_
        self.score_sum_ += other.score_sum_
        for name, entry in other.time_.items():
            mine = self.time_.setdefault(name, [0, 0, 0, 0])
            for i, value in enumerate(entry):
                mine[i] += value
        self.top_ = _best(self.top_ + other.top_)
        return self

    # ------------------------------------------------------------------------------ (de)serializing
    def to_json(self) -> str:
        values = {
            "rows": self.rows_, "ood": self.ood_, "rejected": self.rejected_, "labelled": self.labelled_,
            "correct": self.correct_, "score_sum": self.score_sum_, "time": self.time_, "top": self.top_,
            "feature_sum": self.feature_sum_.tolist(), "feature_sumsq": self.feature_sumsq_.tolist(),
        }
        for name in _COUNT_FIELDS:
            values[name.rstrip("_")] = getattr(self, name).tolist()
        return json.dumps(values)

    @classmethod
    def from_json(cls, text: str, binning: Binning, time_bucket: str = "day") -> "PartialStats":
        values = json.loads(text)
        partial = cls(binning, time_bucket)
        partial.rows_, partial.ood_, partial.labelled_, partial.correct_ = values["rows"], values["ood"], values["labelled"], values["correct"]
        partial.rejected_ = dict(values["rejected"])
        partial.score_sum_ = float(values["score_sum"])
        partial.time_ = {k: list(v) for k, v in values["time"].items()}
        partial.top_ = list(values["top"])
        partial.feature_sum_ = np.asarray(values["feature_sum"], dtype=np.float64)
        partial.feature_sumsq_ = np.asarray(values["feature_sumsq"], dtype=np.float64)
        for name in _COUNT_FIELDS:
            array = np.asarray(values[name.rstrip("_")], dtype=np.int64)
            if array.shape != getattr(partial, name).shape:
                raise ValueError(f"partial statistics {name.rstrip('_')} have {array.size} bins, expected {getattr(partial, name).size}")
            setattr(partial, name, array)
        return partial

    # ------------------------------------------------------------------------------ reading out
    def distances(self, meta: ModelMetadata) -> dict[str, float]:
        """The drift gauges' distances over every row merged so far (empty when no row was scored)."""
        if self.rows_ == 0:
            return {}
        reference = meta.drift_reference
        lower, upper = ks_bounds(self.fine_, self.binning.fine_edges, reference.score_quantiles)
        result = {
            "ood_rate": self.ood_ / self.rows_,
            "score_psi": psi_from_counts(self.fine_, self.binning.fine_edges, reference.score_quantiles),
            "score_ks": lower,
            "score_ks_upper": upper,
            "class_js": drift.js_distance(self.predicted_, reference.class_priors),
        }
        if self.feature_sum_.size and self.feature_sum_.size == len(reference.feature_mean):
            result["feature_mean_shift"] = drift.mean_shift(self.feature_sum_ / self.rows_, reference.feature_mean, reference.feature_std)
        return result


def _best(entries: list[dict]) -> list[dict]:
    """The TOP_K entries of highest score; ties broken by row id, so every merge order agrees."""
    unique = {entry["row_id"]: entry for entry in entries}
    return sorted(unique.values(), key=lambda e: (-e["ood_score"], e["row_id"]))[:TOP_K]


def _counts_at_edges(fine_counts: np.ndarray) -> np.ndarray:
    """count(score <= edges[k]) for every edge k (fine bin k holds edges[k-1] < s <= edges[k])."""
    return np.cumsum(fine_counts)[:-1]


def psi_from_counts(fine_counts, fine_edges, score_quantiles, eps: float = 1e-4, n_bins: int = PSI_BINS) -> float:
    """ncguard.drift.psi from fine-histogram counts instead of the scores themselves.

    drift.psi counts the window in bins (c_{j-1}, c_j] between its cuts; every cut is a fine edge, so
    those counts are differences of the cumulative fine counts, and the rest is drift.psi's formula.
    """
    fine_counts = np.asarray(fine_counts, dtype=np.int64)
    total = int(fine_counts.sum())
    reference = drift._ReferenceCDF(score_quantiles)
    cuts = psi_cuts(score_quantiles, n_bins)
    position = np.searchsorted(fine_edges, cuts)
    if not np.array_equal(np.asarray(fine_edges)[position], cuts):
        raise ValueError("the PSI cuts are not edges of the fine histogram")
    at_cuts = _counts_at_edges(fine_counts)[position]
    window_mass = np.diff(np.concatenate([[0], at_cuts, [total]])) / total
    reference_mass = np.diff(np.concatenate([[0.0], reference.value(cuts), [1.0]]))
    reference_mass, window_mass = np.maximum(reference_mass, eps), np.maximum(window_mass, eps)
    return float(np.sum((window_mass - reference_mass) * np.log(window_mass / reference_mass)))


def ks_bounds(fine_counts, fine_edges, score_quantiles) -> tuple[float, float]:
    """(lower, upper) bounds of ncguard.drift.ks_distance from the fine histogram.

    lower = max over edges e of |F_w(e) - F_ref(e)|: both CDFs are known exactly there.
    upper: for x in a bin (a, b], F_w(x) lies in [F_w(a), F_w(b)] and F_ref(x) in [F_ref(a),
    F_ref(b)] (both are non-decreasing), so |F_w(x) - F_ref(x)| <= max(F_w(b) - F_ref(a),
    F_ref(b) - F_w(a)); below the first edge and above the last, a = -inf and b = +inf with both
    CDFs 0 and 1 there. upper - lower is at most the largest mass one bin holds, of either CDF.
    """
    fine_counts = np.asarray(fine_counts, dtype=np.int64)
    total = fine_counts.sum()
    reference = drift._ReferenceCDF(score_quantiles)
    window = np.concatenate([[0.0], _counts_at_edges(fine_counts) / total, [1.0]])
    ref = np.concatenate([[0.0], reference.value(np.asarray(fine_edges, dtype=np.float64)), [1.0]])
    lower = float(np.max(np.abs(window - ref)))
    upper = float(max(lower, np.max(window[1:] - ref[:-1]), np.max(ref[1:] - window[:-1])))
    return lower, upper
