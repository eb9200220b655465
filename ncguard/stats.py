"""Per-class feature statistics, fitted in one streaming pass, and the bundle that stores them.

Every OOD score in `ncguard.scores` is a function of these moments (plus the linear classifier),
so this module is the single place they are computed. Fitting streams over chunks in float64
and never holds all features at once (DESIGN.md section 1, "Class-mean statistics").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import ConfigError, DataError, ModelError

# Relative cut-off for singular values in the pseudo-inverse of the tied covariance: the same
# numerical-rank tolerance as `np.linalg.matrix_rank` (width * machine epsilon, relative to the
# largest singular value). Directions below it are round-off, not variance, and would otherwise
# be inverted into huge, meaningless weights.
PINV_RTOL_PER_DIM = float(np.finfo(np.float64).eps)


def pinv_rtol(width: int) -> float:
    """The relative singular-value cut-off used for a `width` x `width` covariance."""
    return max(int(width), 1) * PINV_RTOL_PER_DIM


def _as_features(features: np.ndarray) -> np.ndarray:
    array = np.asarray(features)
    if array.ndim != 2:
        raise DataError(f"features must be a 2-D array [N, D], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"features must be numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise DataError("features contain NaN or infinite values")
    return array


def _as_labels(labels: np.ndarray, n_rows: int, n_classes: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DataError(f"labels must be a 1-D array [N], got shape {array.shape}")
    if array.shape[0] != n_rows:
        raise DataError(f"got {n_rows} feature rows but {array.shape[0]} labels")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        bad = array[(array < 0) | (array >= n_classes)][0]
        raise DataError(f"label {bad} is out of range: expected class indices 0..{n_classes - 1}")
    return array


def _bank_keys(seed: int, start: int, count: int) -> np.ndarray:
    """Uniform random keys for the samples with global indices [start, start + count).

    PCG64 can jump ahead, and `Generator.random` uses exactly one 64-bit draw per key, so a
    sample's key depends only on the seed and its position in the stream: the bank comes out the
    same however the data is chunked.
    """
    bit_generator = np.random.PCG64(seed)
    bit_generator.advance(start)
    return np.random.Generator(bit_generator).random(count)


class ClassStatistics:
    """Streaming per-class moments of one layer's features (float64 accumulation).

    Moments are merged chunk by chunk with the pairwise update of Chan, Golub & LeVeque (1979),
    which keeps centred scatter matrices instead of raw sums of squares, so a large mean does not
    swamp a small spread and any chunking gives the same result up to round-off. (Written here
    because no library keeps per-class *and* tied covariances incrementally; scikit-learn's
    `partial_fit` estimators track only per-feature variance.)

    Covariances are maximum-likelihood (divided by the count, ddof=0), as in the Mahalanobis
    detector of Lee et al. (2018); a class seen once therefore has a zero covariance rather than
    a division by zero. Every class must have at least one sample: `finalize` raises `DataError`
    naming the empty classes, because a class mean that does not exist cannot be scored against.

    The bank is a uniform random sample without replacement of K = min(bank_size, N) raw
    feature rows: each sample gets a random key and the bank keeps the K smallest (reservoir
    sampling with random keys, Efraimidis & Spirakis 2006, equal weights). Keys are a function of
    (seed, position in the stream), so the bank is reproducible and identical for any chunking.
    """

    def __init__(
        self,
        n_classes: int,
        *,
        per_class_covariance: bool = True,
        bank_size: int = 2048,
        seed: int = 0,
    ) -> None:
        self.n_classes = n_classes
        self.per_class_covariance = per_class_covariance
        self.bank_size = bank_size
        self.seed = seed

    # ------------------------------------------------------------------ fitting

    def _check_params(self) -> None:
        if not isinstance(self.n_classes, (int, np.integer)) or self.n_classes < 1:
            raise ConfigError(f"n_classes must be a positive integer, got {self.n_classes!r}")
        if not isinstance(self.bank_size, (int, np.integer)) or self.bank_size < 0:
            raise ConfigError(f"bank_size must be a non-negative integer, got {self.bank_size!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")

    def _start(self, width: int) -> None:
        n_classes = int(self.n_classes)
        self._width = width
        self._n_seen = 0
        self._counts = np.zeros(n_classes, dtype=np.int64)
        self._means = np.zeros((n_classes, width))
        self._within_scatter = np.zeros((width, width))
        self._class_scatter = np.zeros((n_classes, width, width)) if self.per_class_covariance else None
        self._bank = np.zeros((0, width))
        self._bank_labels = np.zeros(0, dtype=np.int64)
        self._bank_keys = np.zeros(0)

    def partial_fit(self, features: np.ndarray, labels: np.ndarray) -> "ClassStatistics":
        """Add one chunk [N, D] with its labels [N]; call `finalize` after the last chunk."""
        self._check_params()
        features = _as_features(features)
        labels = _as_labels(labels, features.shape[0], int(self.n_classes))
        if not hasattr(self, "_width"):
            if features.shape[1] == 0:
                raise DataError("features have zero width")
            self._start(features.shape[1])
        elif features.shape[1] != self._width:
            raise DataError(
                f"feature width changed between chunks: expected {self._width}, got {features.shape[1]}"
            )
        if features.shape[0] == 0:
            return self
        self._merge_moments(features, labels)
        self._merge_bank(features, labels)
        self._n_seen += features.shape[0]
        return self

    def _merge_moments(self, features: np.ndarray, labels: np.ndarray) -> None:
        n_classes = int(self.n_classes)
        chunk_counts = np.bincount(labels, minlength=n_classes)
        present = chunk_counts > 0
        chunk_sums = np.zeros((n_classes, self._width))
        np.add.at(chunk_sums, labels, features)
        chunk_means = np.zeros_like(chunk_sums)
        chunk_means[present] = chunk_sums[present] / chunk_counts[present, None]

        centred = features - chunk_means[labels]
        chunk_within = centred.T @ centred

        old_counts = self._counts
        new_counts = old_counts + chunk_counts
        delta = chunk_means - self._means
        # Chan et al.: M2 = M2_a + M2_b + delta delta^T * n_a n_b / n, per class.
        weight = np.zeros(n_classes)
        weight[present] = old_counts[present] * chunk_counts[present] / new_counts[present]
        self._within_scatter += chunk_within + (delta * weight[:, None]).T @ delta
        if self._class_scatter is not None:
            for c in np.flatnonzero(present):
                rows = centred[labels == c]
                self._class_scatter[c] += rows.T @ rows + weight[c] * np.outer(delta[c], delta[c])
        self._means[present] += delta[present] * (chunk_counts[present] / new_counts[present])[:, None]
        self._counts = new_counts

    def _merge_bank(self, features: np.ndarray, labels: np.ndarray) -> None:
        capacity = int(self.bank_size)
        keys = _bank_keys(int(self.seed), self._n_seen, features.shape[0])
        all_keys = np.concatenate([self._bank_keys, keys])
        keep = np.argsort(all_keys, kind="stable")[:capacity]
        self._bank = np.concatenate([self._bank, features])[keep]
        self._bank_labels = np.concatenate([self._bank_labels, labels])[keep]
        self._bank_keys = all_keys[keep]

    def finalize(self) -> "ClassStatistics":
        """Turn the accumulated moments into the learned attributes (ending in `_`)."""
        if not hasattr(self, "_width") or self._n_seen == 0:
            raise DataError("no features were given: call partial_fit with at least one sample before finalize")
        empty = np.flatnonzero(self._counts == 0)
        if empty.size:
            raise DataError(
                f"class(es) {empty.tolist()} have no samples; every one of the {int(self.n_classes)} "
                "classes needs at least one sample to have a mean"
            )
        total = int(self._counts.sum())
        width = self._width
        self.counts_ = self._counts.copy()
        self.means_ = self._means.copy()
        self.global_mean_ = (self._counts[:, None] * self._means).sum(axis=0) / total
        self.covariance_ = self._within_scatter / total
        self.covariance_ = (self.covariance_ + self.covariance_.T) / 2
        if self._class_scatter is not None:
            class_cov = self._class_scatter / self._counts[:, None, None]
            self.class_covariances_ = (class_cov + np.swapaxes(class_cov, 1, 2)) / 2
        elif hasattr(self, "class_covariances_"):
            del self.class_covariances_
        self._derive()
        self.bank_ = self._bank.copy()
        self.bank_labels_ = self._bank_labels.copy()
        return self

    def _derive(self) -> None:
        """precision_, second_moment_ and feature_std_ from counts_, means_, global_mean_ and covariance_.

        Recomputed rather than stored (`to_arrays` leaves them out): they are functions of the moments,
        and the two [D, D] ones are two thirds of a tied-only statistic's file (a run's 768-wide joint
        statistic: 9.4 MB of 14)."""
        width = self.covariance_.shape[0]
        self.precision_ = np.linalg.pinv(self.covariance_, rtol=pinv_rtol(width), hermitian=True)
        total_covariance = self.total_covariance_
        self.second_moment_ = total_covariance + np.outer(self.global_mean_, self.global_mean_)
        self.feature_std_ = np.sqrt(np.clip(np.diag(total_covariance), 0.0, None))

    @property
    def total_covariance_(self) -> np.ndarray:
        """The covariance of all samples about the global mean: the tied within-class covariance plus
        the count-weighted between-class covariance of the class means (centred, so no large-offset
        cancellation as second_moment_ - mean mean^T would have)."""
        self._require_fitted()
        offsets = self.means_ - self.global_mean_
        return self.covariance_ + (offsets * (self.counts_ / self.counts_.sum())[:, None]).T @ offsets

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "ClassStatistics":
        """Fit on all data at once: one `partial_fit` from a fresh start, then `finalize`."""
        for name in [name for name in vars(self) if name.startswith("_") or name.endswith("_")]:
            delattr(self, name)
        return self.partial_fit(features, labels).finalize()

    def _require_fitted(self) -> None:
        if not hasattr(self, "means_"):
            raise ConfigError("these statistics are not fitted yet: call fit, or partial_fit then finalize")

    # ------------------------------------------------------------------ (de)serialisation

    _LEARNED = (
        "counts_",
        "means_",
        "global_mean_",
        "covariance_",
        "precision_",
        "class_covariances_",
        "second_moment_",
        "feature_std_",
        "bank_",
        "bank_labels_",
    )
    _DERIVED = ("precision_", "second_moment_", "feature_std_")  # recomputed on load (`_derive`), not stored

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fitted state as plain arrays (names without the trailing `_`), for `np.savez`; the derived
        arrays (`_DERIVED`) are left out and recomputed by `from_arrays`, except for statistics read from a
        file that stored them, which are written back as they were (the same checksum)."""
        self._require_fitted()
        arrays = {
            "n_classes": np.asarray(int(self.n_classes), dtype=np.int64),
            "per_class_covariance": np.asarray(bool(self.per_class_covariance)),
            "bank_size": np.asarray(int(self.bank_size), dtype=np.int64),
            "seed": np.asarray(int(self.seed), dtype=np.int64),
            "bank_keys": self._bank_keys.copy(),
        }
        stored_derived = getattr(self, "_stored_derived", False)  # a file from before keeps its arrays and checksum
        for name in self._LEARNED:
            if hasattr(self, name) and (stored_derived or name not in self._DERIVED):
                arrays[name[:-1]] = np.asarray(getattr(self, name)).copy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ClassStatistics":
        """Rebuild fitted statistics from `to_arrays` output; they can take more `partial_fit` chunks."""
        required = {"n_classes", "per_class_covariance", "bank_size", "seed", "bank_keys"}
        required |= {name[:-1] for name in cls._LEARNED if name != "class_covariances_" and name not in cls._DERIVED}
        missing = sorted(required - set(arrays))
        if missing:
            raise ModelError(f"class statistics are missing arrays: {', '.join(missing)}")
        try:
            stats = cls(
                int(arrays["n_classes"]),
                per_class_covariance=bool(arrays["per_class_covariance"]),
                bank_size=int(arrays["bank_size"]),
                seed=int(arrays["seed"]),
            )
            learned = {name: np.array(arrays[name[:-1]]) for name in cls._LEARNED if name[:-1] in arrays}
            counts = learned["counts_"].astype(np.int64)
            n_classes, width = learned["means_"].shape
            expected = {
                "counts_": (n_classes,),
                "global_mean_": (width,),
                "covariance_": (width, width),
                "precision_": (width, width),
                "class_covariances_": (n_classes, width, width),
                "second_moment_": (width, width),
                "feature_std_": (width,),
                "bank_labels_": (learned["bank_"].shape[0],),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"class statistics arrays are malformed: {exc}") from exc
        for name, shape in expected.items():
            if name in learned and learned[name].shape != shape:
                raise ModelError(f"class statistics array {name[:-1]!r} has shape {learned[name].shape}, expected {shape}")
        if n_classes != stats.n_classes or learned["bank_"].shape[1:] != (width,):
            raise ModelError("class statistics arrays disagree on the number of classes or the feature width")
        if stats.per_class_covariance != ("class_covariances_" in learned):
            raise ModelError("class statistics say per_class_covariance but the arrays disagree")
        for name, value in learned.items():
            setattr(stats, name, value)
        stats._stored_derived = all(name in learned for name in cls._DERIVED)
        if not stats._stored_derived:  # files written since they are not stored
            stats._derive()
        # Rebuild the accumulators so that more chunks can be merged in.
        stats._width = width
        stats._n_seen = int(counts.sum())
        stats._counts = counts.copy()
        stats._means = learned["means_"].copy()
        stats._within_scatter = learned["covariance_"] * stats._n_seen
        stats._class_scatter = (
            learned["class_covariances_"] * counts[:, None, None] if stats.per_class_covariance else None
        )
        stats._bank = learned["bank_"].copy()
        stats._bank_labels = learned["bank_labels_"].astype(np.int64)
        stats._bank_keys = np.array(arrays["bank_keys"], dtype=np.float64)
        return stats


# ---------------------------------------------------------------------- bundle

LAYER_PREFIX = "layer/"
JOINT_PREFIX = "joint/"
JOINT_SEPARATOR = "+"
CHECKSUM_KEY = "checksum"


def joint_name(parts: tuple[str, ...] | list[str]) -> str:
    """The key of the joint statistics of several layers' features concatenated in this order:
    ("block3", "detection", "transfer") -> "block3+detection+transfer"."""
    parts = tuple(parts)
    if len(parts) < 2 or any(not isinstance(part, str) or not part or JOINT_SEPARATOR in part or "/" in part for part in parts):
        raise DataError(f"joint statistics need at least two layer names without {JOINT_SEPARATOR!r} or '/', got {parts!r}")
    return JOINT_SEPARATOR.join(parts)


def joint_parts(name: str) -> tuple[str, ...]:
    """The layers a joint statistic concatenates, in order (the inverse of `joint_name`)."""
    return tuple(name.split(JOINT_SEPARATOR))


def joint_features(features, name: str) -> np.ndarray:
    """[N, sum of widths]: the layers of joint statistic `name` from a {layer: [N, D]} mapping, concatenated."""
    missing = [part for part in joint_parts(name) if part not in features]
    if missing:
        raise DataError(f"the joint statistics {name!r} need the features of {', '.join(missing)}")
    return np.concatenate([np.asarray(features[part], dtype=np.float64) for part in joint_parts(name)], axis=1)


def arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over each array's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        for part in (name, array.dtype.str, repr(tuple(array.shape))):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
        data = array.tobytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


@dataclass
class StatisticsBundle:
    """Everything a model's scores need: named layers' statistics + the classifier on the detection layer.

    `layers` may hold any number of named layers (e.g. "transfer", "detection", pooled conv
    blocks). `weight` [C, D] and `bias` [C] are the linear classifier, logits = f @ W.T + b.
    `joint` holds statistics of several layers' features concatenated (`joint_name`), for scores that
    need how layers vary together (the cross-covariances that per-layer statistics do not keep);
    each joint statistic's parts are layers of the bundle. Bundles written before it load with none.
    """

    layers: dict[str, ClassStatistics]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    joint: dict[str, ClassStatistics] = field(default_factory=dict)

    def _check(self) -> None:
        if not self.layers:
            raise DataError("a statistics bundle needs at least one layer")
        n_classes = len(self.classes)
        for name, stats in self.layers.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise DataError(f"layer name {name!r} must be a non-empty string without '/'")
            if not isinstance(stats, ClassStatistics):
                raise DataError(f"layer {name!r} is not a ClassStatistics")
            stats._require_fitted()
            if stats.means_.shape[0] != n_classes:
                raise DataError(f"layer {name!r} has {stats.means_.shape[0]} classes but {n_classes} class names were given")
        for name, stats in self.joint.items():
            parts = joint_parts(name)
            if joint_name(parts) != name or any(part not in self.layers for part in parts):
                raise DataError(f"joint statistics {name!r} must join layers of the bundle ({', '.join(self.layers)})")
            if not isinstance(stats, ClassStatistics):
                raise DataError(f"joint statistics {name!r} are not a ClassStatistics")
            stats._require_fitted()
            width = sum(self.layers[part].means_.shape[1] for part in parts)
            if stats.means_.shape != (n_classes, width):
                raise DataError(f"joint statistics {name!r} have means of shape {stats.means_.shape}, expected ({n_classes}, {width})")
        if self.weight is not None:
            weight = np.asarray(self.weight)
            if weight.ndim != 2 or weight.shape[0] != n_classes:
                raise DataError(f"classifier weight must be [C={n_classes}, D], got shape {weight.shape}")
        if self.bias is not None:
            bias = np.asarray(self.bias)
            if bias.shape != (n_classes,):
                raise DataError(f"classifier bias must be [C={n_classes}], got shape {bias.shape}")
            if self.weight is None:
                raise DataError("a classifier bias was given without a weight")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as exc:
            raise DataError(f"bundle meta must be JSON-serialisable: {exc}") from exc

    def _arrays(self) -> dict[str, np.ndarray]:
        self._check()
        arrays: dict[str, np.ndarray] = {
            "classes": np.asarray([str(name) for name in self.classes], dtype=np.str_),
            "meta": np.asarray([json.dumps(self.meta, sort_keys=True)], dtype=np.str_),
        }
        if self.weight is not None:
            arrays["weight"] = np.asarray(self.weight, dtype=np.float64)
        if self.bias is not None:
            arrays["bias"] = np.asarray(self.bias, dtype=np.float64)
        for prefix, group in ((LAYER_PREFIX, self.layers), (JOINT_PREFIX, self.joint)):
            for layer, stats in group.items():
                for name, array in stats.to_arrays().items():
                    arrays[f"{prefix}{layer}/{name}"] = array
        return arrays

    def checksum(self) -> str:
        """sha256 over array names, dtypes, shapes and bytes in sorted order."""
        return arrays_checksum(self._arrays())

    def save(self, path: str | os.PathLike) -> str:
        """Write one .npz atomically; return its checksum."""
        arrays = self._arrays()
        checksum = arrays_checksum(arrays)
        arrays[CHECKSUM_KEY] = np.asarray(checksum, dtype=np.str_)
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
        return checksum

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StatisticsBundle":
        """Read a bundle written by `save`; refuse it (ModelError) if its checksum does not match."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError) as exc:
            raise ModelError(f"cannot read statistics file {path}: {exc}") from exc
        if CHECKSUM_KEY not in arrays:
            raise ModelError(f"statistics file {path} has no checksum; it was not written by ncguard")
        stored = str(arrays.pop(CHECKSUM_KEY))
        if arrays_checksum(arrays) != stored:
            raise ModelError(f"statistics file {path} does not match its checksum: it was modified or corrupted")
        try:
            classes = tuple(str(name) for name in arrays.pop("classes"))
            meta = json.loads(str(arrays.pop("meta")[0]))
        except (KeyError, IndexError, ValueError) as exc:
            raise ModelError(f"statistics file {path} lacks class names or meta: {exc}") from exc
        weight = arrays.pop("weight", None)
        bias = arrays.pop("bias", None)
        grouped: dict[str, dict[str, dict[str, np.ndarray]]] = {LAYER_PREFIX: {}, JOINT_PREFIX: {}}
        for key, array in arrays.items():
            prefix = next((prefix for prefix in grouped if key.startswith(prefix)), None)
            if prefix is None or key.count("/") != 2:
                raise ModelError(f"statistics file {path} has an unexpected array {key!r}")
            _, layer, name = key.split("/")
            grouped[prefix].setdefault(layer, {})[name] = array
        layers, joint = ({layer: ClassStatistics.from_arrays(group) for layer, group in grouped[prefix].items()} for prefix in (LAYER_PREFIX, JOINT_PREFIX))
        bundle = cls(layers=layers, weight=weight, bias=bias, classes=classes, meta=meta, joint=joint)
        try:
            bundle._check()
        except DataError as exc:
            raise ModelError(f"statistics file {path} is inconsistent: {exc}") from exc
        return bundle
