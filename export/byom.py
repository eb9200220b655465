"""Bring your own model: OOD scoring for an existing ONNX classifier, without retraining (torch-free).

`fit_existing_model` takes any ONNX classifier and a labelled in-distribution data set and returns
a model with the same contract as `ncguard export` (DESIGN.md section 3):
1. the graph is reshaped (export.graph_surgery): input `input` with the user's scaling, outputs
   `logits` and `features` read from the tensors the user names;
2. the data runs through ONNX Runtime in chunks; the class statistics of the features are fitted
   streaming on the fit split, and a calibration split is held out;
3. the detector is built and fitted from those statistics (`ncguard.scores.build_detector`, as
   `ncguard export` does; held-out features too for a detector that needs them), and the model
   is finished by the same pipeline as `ncguard export` (`export.finish.finish_model`): score and
   softmax appended, the graph checked against the bare network and the NumPy reference, the
   threshold calibrated on the held-out ID split only, and the softmax temperature of
   `probabilities` fitted on the same split (Guo et al. 2017, ncguard.temperature), so the wrapped
   model's confidence is calibrated even when the original's was not.

The features are stored as the bundle's `transfer` layer: they are the model's transfer features
(the `features` output the drift gauges watch), the layer the classifier acts on, and the layer a
single score reads. `features` may name several tensors (`--features A,B,C`, early blocks first, the
penultimate layer last): the ones before the last become layers "block1", "block2", ... (a feature
map read through its per-channel mean and std, ncguard.pooling, as ncguard's own models give their
convolutional blocks to the `fused` score by default; `ncguard train --block-grid` has no
counterpart here), and the default score is then `fused` (ncguard.scores.defaults), with Mahalanobis
on every block named and DDU on the penultimate layer (ncguard.scores.fused.default_components with
every_block: what the user names is scored; for their own models ncguard scores the last block
alone, and `ncguard inspect` suggests that shape).

Scores that combine features with the classifier (vim, nci) need its weight and bias. A foreign
graph does not say which initializers those are, so they are recovered by least squares from the
features to the logits on the fit split and used only if they reproduce the held-out logits
within the float32 parity tolerance, i.e. when the logits are an affine function of the features
(the usual case for the penultimate tensor).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, fields

import numpy as np
import onnx
from tqdm import tqdm

from export.finish import TRANSFER_LAYER, ExportReport, finish_model
from export.graph_reading import check_layer, check_matrix
from export.graph_surgery import InputTransform, Network, build_network, feature_list, layer_names
from export.parity import allowed_error
from ncguard.calibration import DEFAULT_TPR, check_open_unit, split_for_calibration
from ncguard.data import Dataset, iter_batches
from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.model_file import INPUT_NAME
from ncguard.runtime import open_session
from ncguard.scores import LOGITS, SCORE_NAMES, SCORES, Fused, build_detector
from ncguard.pooling import channel_mean_std
from ncguard.scores.defaults import FOREIGN, FOREIGN_MULTI, default_score
from ncguard.scores.fused import DETECTION_SCORE, default_components
from ncguard.stats import ClassStatistics, StatisticsBundle

log = logging.getLogger("ncguard.fit")

DEFAULT_BATCH_SIZE = 256
DEFAULT_CALIBRATION_FRACTION = 0.1
# The tied covariance and its pseudo-inverse are D x D float64 while fitting (128 MB each at 4096).
MAX_FEATURE_WIDTH = 4096


class LinearReadout:
    """Least-squares (W, b) with logits ~ features @ W.T + b, from streamed normal equations.

    Accumulates A^T A and A^T L for A = [features, 1] in float64, then solves with `np.linalg.lstsq`
    (minimum-norm solution when some features are constant, e.g. dead ReLUs).
    """

    def partial_fit(self, features: np.ndarray, logits: np.ndarray) -> "LinearReadout":
        design = np.hstack([np.asarray(features, dtype=np.float64), np.ones((len(features), 1))])
        targets = np.asarray(logits, dtype=np.float64)
        if not hasattr(self, "_gram"):
            self._gram = np.zeros((design.shape[1], design.shape[1]))
            self._cross = np.zeros((design.shape[1], targets.shape[1]))
        self._gram += design.T @ design
        self._cross += design.T @ targets
        return self

    def finalize(self) -> "LinearReadout":
        if not hasattr(self, "_gram"):
            raise DataError("no features were given to recover the classifier from")
        solution = np.linalg.lstsq(self._gram, self._cross, rcond=None)[0]
        self.weight_ = solution[:-1].T.copy()
        self.bias_ = solution[-1].copy()
        return self

    def worst_ratio(self, features: np.ndarray, logits: np.ndarray) -> float:
        """max |predicted - logits| / the float32 parity tolerance (<= 1: the readout reproduces them)."""
        predicted = np.asarray(features, dtype=np.float64) @ self.weight_.T + self.bias_
        reference = np.asarray(logits, dtype=np.float64)
        return float((np.abs(predicted - reference) / allowed_error(reference)).max(initial=0.0))


@dataclass
class FitReport(ExportReport):
    n_classes: int = 0
    width: int = 0
    n_fit: int = 0
    n_calibration: int = 0
    fit_accuracy: float = float("nan")
    classifier_recovered: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)  # layer -> {"tensor", "width", "pooled"}


def _run(session, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    try:
        return session.run(names, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
    except Exception as exc:  # onnxruntime raises its own C++ error types
        raise DataError(f"ONNX Runtime could not run the model on the data (shape {list(x.shape)}): {exc}") from None


def layer_features(raw: np.ndarray, pooled: bool) -> np.ndarray:
    """A layer's [n, D] features from its raw tensor: the per-channel statistics of a feature map
    (the formula `Network.finished` writes as nodes), else the tensor flattened."""
    return channel_mean_std(raw) if pooled else raw.reshape(len(raw), -1)


def _checked_batch(network: Network, session, x: np.ndarray, kinds: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits [n, C], {layer: features [n, D]}) for one chunk, after checking the raw tensors' shapes.

    `kinds` gathers each layer's (width, pooled) from the first chunk; later chunks must agree.
    """
    layers = list(network.feature_tensors)
    logits, logits_shape, *raws = _run(session, ["logits", Network.probe("logits"), *map(Network.raw, layers)], x)
    check_matrix(network.logits_tensor, [int(d) for d in logits_shape], "--logits", rows=len(x))
    features = {}
    for layer, raw in zip(layers, raws):
        tensor = network.feature_tensors[layer]
        width, pooled = check_layer(tensor, list(raw.shape), "--features", rows=len(x))
        if kinds.setdefault(layer, (width, pooled)) != (width, pooled):
            raise ModelError(f"--features {tensor!r} changed shape between batches (now {list(raw.shape)}); ncguard needs a fixed feature width")
        features[layer] = layer_features(raw, pooled)
    return logits, features


def _stream(network: Network, session, x: np.ndarray, index: np.ndarray, batch_size: int, desc: str, kinds: dict):
    batches = iter_batches(len(index), batch_size)
    for rows in tqdm(batches, total=math.ceil(len(index) / batch_size), desc=desc, unit="batch", leave=False, disable=None):
        yield rows, *_checked_batch(network, session, x[index[rows]], kinds)


def _check_classes(n_classes: int, data: Dataset, logits_tensor: str) -> None:
    if n_classes < 2:
        raise ModelError(f"--logits {logits_tensor!r} has width {n_classes}; logits need one column per class (at least 2)")
    k = len(data.classes)
    if k > n_classes:
        missing = ", ".join(repr(c) for c in data.classes[n_classes : n_classes + 5]) + (", ..." if k - n_classes > 5 else "")
        raise DataError(
            f"the data {data.name} has {k} classes but the model's logits ({logits_tensor!r}) have {n_classes}: "
            f"class(es) {missing} are not among the model's outputs. Give data with the model's classes only, "
            "labelled in the model's output order"
        )
    if k < n_classes:
        raise DataError(
            f"the model's logits ({logits_tensor!r}) have {n_classes} classes but the data {data.name} has {k}: "
            "every class needs examples for its statistics; give data covering all the model's classes, "
            "labelled in the model's output order"
        )


def _check_width(width: int, features_tensor: str) -> None:
    if width > MAX_FEATURE_WIDTH:
        raise ModelError(
            f"--features {features_tensor!r} is {width} wide; ncguard fits a {width} x {width} covariance and "
            f"accepts at most {MAX_FEATURE_WIDTH} features: choose a narrower (pooled, penultimate) tensor"
        )


def _fit_statistics(network, session, data, fit_index, kinds, *, batch_size, per_class_covariance, seed):
    """({layer: finalized ClassStatistics}, finalized LinearReadout on the last layer, fit accuracy), one
    streaming pass."""
    stats = readout = None
    last = next(reversed(network.feature_tensors))
    correct = 0
    for rows, logits, features in _stream(network, session, data.x, fit_index, batch_size, "fitting class statistics", kinds):
        if stats is None:
            _check_classes(logits.shape[1], data, network.logits_tensor)
            for layer, values in features.items():
                _check_width(values.shape[1], network.feature_tensors[layer])
            stats = {layer: ClassStatistics(logits.shape[1], per_class_covariance=per_class_covariance, seed=seed) for layer in features}
            readout = LinearReadout()
        labels = data.y[fit_index[rows]]
        for layer, values in features.items():
            stats[layer].partial_fit(values, labels)
        readout.partial_fit(features[last], logits)
        correct += int((logits.argmax(axis=1) == labels).sum())
    return {layer: s.finalize() for layer, s in stats.items()}, readout.finalize(), correct / len(fit_index)


def _gather(network, session, x: np.ndarray, batch_size: int, desc: str, kinds: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    parts = list(_stream(network, session, x, np.arange(len(x)), batch_size, desc, kinds))
    return np.concatenate([p[1] for p in parts]), {layer: np.concatenate([p[2][layer] for p in parts]) for layer in network.feature_tensors}


def _needs_class_covariances(score: str) -> bool:
    """Whether the statistics must keep per-class covariances for `score` (`fused` here reads the
    default components, whose class-level part is `DETECTION_SCORE`)."""
    return SCORES[DETECTION_SCORE if score == Fused.name else score].needs_class_covariances


def _fit_score(score: str, bundle: StatisticsBundle, held_out: dict, readout_ratio: float, features_tensor: str):
    """The fitted detector; a score that needs the classifier says why it could not be recovered."""
    components = default_components(tuple(bundle.layers), TRANSFER_LAYER, every_block=True) if score == Fused.name else None
    detector = build_detector(score, bundle, components=components)
    try:
        return detector.fit(bundle, held_out if detector.needs_held_out else None)
    except ConfigError as exc:
        if bundle.weight is None:
            raise ConfigError(
                f"{exc}. The logits are not an affine function of --features {features_tensor!r} (a least-squares "
                f"fit misses the held-out logits by {readout_ratio:.3g}x the tolerance), so the classifier cannot "
                "be recovered: name the tensor that feeds the final linear layer, or choose another --score"
            ) from None
        raise


def source_digest(model: onnx.ModelProto) -> str:
    """sha256 of the original graph, recorded so the wrapped file says what it was made from."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def fit_existing_model(
    source: onnx.ModelProto,
    data: Dataset,
    *,
    features: str | list[str],
    logits: str | None = None,
    score: str | None = None,
    tpr: float = DEFAULT_TPR,
    transform: InputTransform = InputTransform(),
    provider: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    seed: int = 0,
    name: str = "ncguard-model",
    source_label: str = "",
) -> tuple[onnx.ModelProto, FitReport]:
    """The stamped ONNX model (not yet written) and what was fitted and checked (module docstring).

    `features` is one tensor name, "A,B,C", or a list of names (early blocks first, the penultimate
    layer last).
    """
    tpr = check_open_unit(tpr, "--tpr")  # before the data pass, not after it
    names = feature_list(features)
    score = score or default_score(FOREIGN if len(names) == 1 else FOREIGN_MULTI)
    if score not in SCORE_NAMES:
        raise ConfigError(f"unknown score {score!r}; choose one of: {', '.join(SCORE_NAMES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    network = build_network(
        source, features=dict(zip(layer_names(len(names), TRANSFER_LAYER), names)), logits=logits,
        input_shape=data.input_shape, transform=transform, data_name=data.name,
    )
    fit_index, calibration_index = split_for_calibration(len(data), calibration_fraction, seed)
    session = open_session(network.model.SerializeToString(), provider=provider)
    kinds: dict[str, tuple[int, bool]] = {}
    stats, readout, accuracy = _fit_statistics(
        network, session, data, fit_index, kinds, batch_size=batch_size, per_class_covariance=_needs_class_covariances(score), seed=seed
    )
    calibration_x = data.x[calibration_index]
    held_out_logits, held_out_features = _gather(network, session, calibration_x, batch_size, "held-out logits", kinds)
    readout_ratio = readout.worst_ratio(held_out_features[TRANSFER_LAYER], held_out_logits)
    linear = readout_ratio <= 1.0
    n_classes, width = stats[TRANSFER_LAYER].means_.shape
    tensors = {layer: network.feature_tensors[layer] for layer in stats}
    bundle = StatisticsBundle(
        layers=stats,
        weight=readout.weight_ if linear else None,
        bias=readout.bias_ if linear else None,
        classes=tuple(str(c) for c in data.classes),
        meta={
            "source_model": source_label, "features_tensor": network.features_tensor, "logits_tensor": network.logits_tensor,
            "classifier_layer": TRANSFER_LAYER, **({"feature_tensors": tensors} if len(tensors) > 1 else {}),
        },
    )
    held_out = {**held_out_features, LOGITS: held_out_logits}
    detector = _fit_score(score, bundle, held_out, readout_ratio, network.features_tensor)
    log.info("fitting score %s on %s", score, ", ".join(detector.layers))
    finished, graph_tensors = network.finished(n_classes, kinds)

    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        """The bare network's own outputs, each layer read through NumPy: what the finished graph must reproduce."""
        out_logits, out_features = _gather(network, session, x, batch_size, "parity reference", kinds)
        return {LOGITS: out_logits, "features": out_features[TRANSFER_LAYER], **out_features}

    warnings = []
    chance = 1.0 / n_classes
    if accuracy < chance + (1.0 - chance) / 2:
        warnings.append(
            f"the model agrees with the data's labels on only {accuracy:.1%} of the fit inputs: check that the data's "
            "classes are labelled in the model's output order and that --input-scale/--input-mean/--input-std match "
            "what the model expects"
        )
    unread = [layer for layer in stats if layer not in detector.layers]
    if unread:
        warnings.append(
            f"score {score} reads {', '.join(layer for layer in detector.layers if layer != LOGITS) or 'the logits'} only; "
            f"the features of {', '.join(repr(tensors[layer]) for layer in unread)} go unused (--score fused reads them all)"
        )
    layers = {
        layer: {"tensor": tensors[layer], "width": int(kinds[layer][0]), "pooled": bool(kinds[layer][1])} for layer in stats
    }
    proto, report = finish_model(
        finished,
        detector,
        {**{layer: graph_tensors[layer] for layer in detector.layers if layer != LOGITS}, LOGITS: "logits"},
        reference,
        bundle,
        calibration_x,
        data.y[calibration_index],
        tpr=tpr,
        provider=provider,
        classes=[str(c) for c in data.classes],
        input_shape=list(data.input_shape),
        input_scale=data.input_scale,
        name=name,
        seed=seed,
        extra={
            "exporter": "ncguard fit (bring your own model)",
            "source_model": source_label,
            "source_sha256": source_digest(source),
            "features_tensor": network.features_tensor,
            **({"feature_layers": layers} if len(layers) > 1 or kinds[TRANSFER_LAYER][1] else {}),
            "logits_tensor": network.logits_tensor,
            "input_transform": transform.as_dict(),
            "data": data.name,
            "fit_inputs": int(len(fit_index)),
            "fit_accuracy": float(accuracy),
            "classifier_recovered": bool(linear),
        },
    )
    report = FitReport(
        **{f.name: getattr(report, f.name) for f in fields(ExportReport)},
        n_classes=int(n_classes), width=int(width), n_fit=int(len(fit_index)), n_calibration=int(len(calibration_index)),
        fit_accuracy=float(accuracy), classifier_recovered=bool(linear), notes=list(network.notes), warnings=warnings,
        layers=layers,
    )
    return proto, report
