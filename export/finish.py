"""The last steps every ncguard model goes through, whatever produced its network (torch-free).

`ncguard export` (a trained DualHeadModel, export.torch_export) and `ncguard fit` (an existing
ONNX classifier, export.byom) both hand over a network graph with input `input` and outputs
`logits` and `features`; from there the model is finished the same way: softmax and the OOD
score appended with the outputs in the contract's order (`finish_contract`), the threshold
calibrated on held-out ID data with the graph's own scores, the softmax temperature fitted on the
same held-out data when its labels are given (ncguard.temperature, Guo et al. 2017), and the
metadata of DESIGN.md section 3 (drift reference and temperature included) stamped
(`calibrate_and_stamp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.detectors import TRANSFER_LAYER
from export.parity import ParityResult
from export.score_graph import append_ood_head
from ncguard.calibration import calibrate_threshold, expected_calibration_error
from ncguard.drift import reference_quantiles
from ncguard.errors import DataError
from ncguard.model_file import OUTPUT_NAMES, DriftReference, ModelMetadata, stamp
from ncguard.runtime import run_batched
from ncguard.stats import StatisticsBundle
from ncguard.temperature import fit_temperature, softmax

DRIFT_QUANTILES = 100
PARITY_MAX_ROWS = 2048  # ID rows checked against the reference (plus as many noise rows, at most 256)
PARITY_NOISE_ROWS = 256
TEMPERATURE_TENSOR = "ncguard/temperature"  # the scalar T in probabilities = softmax(logits / T)


@dataclass
class ExportReport:
    score: str
    layer: str | None
    threshold: float
    providers: list[str]
    parity: list[ParityResult] = field(default_factory=list)
    # softmax temperature and the held-out ECE (15 bins) before/after it (None: no labels, not fitted)
    temperature: float = 1.0
    calibration_error: dict | None = None

    def describe(self) -> list[str]:
        return [result.describe() for result in self.parity]


def finish_contract(network: onnx.ModelProto, detector, score_features: str | None) -> onnx.ModelProto:
    """Append softmax(logits / T) and the OOD score to a network with outputs `logits` and `features`.

    `score_features` names the tensor the score reads (None for logit-only scores). The result
    has exactly the contract's outputs, in their order. `network` gains the softmax nodes (it is
    not copied first: models can be large, and append_ood_head copies it anyway). T is the
    initializer TEMPERATURE_TENSOR, 1 until `calibrate_and_stamp` fits it (`set_temperature`);
    `logits`, and so the labels and every OOD score, do not depend on it.
    """
    graph = network.graph
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), TEMPERATURE_TENSOR))
    graph.node.append(helper.make_node("Div", ["logits", TEMPERATURE_TENSOR], ["ncguard/scaled_logits"], name="ncguard/temperature_scaling"))
    graph.node.append(helper.make_node("Softmax", ["ncguard/scaled_logits"], ["probabilities"], axis=1, name="ncguard/softmax"))
    logits_info = next(o for o in graph.output if o.name == "logits")
    probabilities = onnx.ValueInfoProto()
    probabilities.CopyFrom(logits_info)
    probabilities.name = "probabilities"
    graph.output.append(probabilities)
    model = append_ood_head(network, detector, features=score_features, logits="logits", output="ood_score")
    by_name = {o.name: o for o in model.graph.output}
    ordered = [by_name[name] for name in OUTPUT_NAMES]
    del model.graph.output[:]
    model.graph.output.extend(ordered)
    return model


def set_temperature(model: onnx.ModelProto, temperature: float) -> onnx.ModelProto:
    """Set the T of a graph finished by `finish_contract` (in place; returns the model)."""
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == TEMPERATURE_TENSOR:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.array(temperature, dtype=np.float32), TEMPERATURE_TENSOR))
            return model
    raise DataError(f"the graph has no {TEMPERATURE_TENSOR!r} initializer: it was not finished by finish_contract")


def fit_calibration(logits: np.ndarray, labels: np.ndarray) -> tuple[float, dict]:
    """(T, report): the temperature minimizing the held-out NLL, and the held-out expected calibration
    error (15 bins) of softmax(logits) before and softmax(logits / T) after (Guo et al. 2017)."""
    temperature = fit_temperature(logits, labels)
    report = {
        "inputs": int(len(labels)),
        "ece_before": expected_calibration_error(softmax(logits), labels),
        "ece_after": expected_calibration_error(softmax(logits, temperature), labels),
    }
    return temperature, report


def parity_inputs(calibration_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Held-out ID inputs plus uniform noise of the same shape, so the check also covers OOD-like features."""
    rng = np.random.default_rng(seed)
    rows = calibration_x[:PARITY_MAX_ROWS]
    noise = rng.random((min(PARITY_NOISE_ROWS, max(len(rows), 1)), *calibration_x.shape[1:]), dtype=np.float32)
    return np.concatenate([rows.astype(np.float32, copy=False), noise])


def drift_reference(bundle: StatisticsBundle, id_scores: np.ndarray, id_features: np.ndarray) -> DriftReference:
    """ID score quantiles, class priors and the transfer features' mean and std, for the drift gauges."""
    stats = bundle.layers.get(TRANSFER_LAYER)
    if stats is not None and stats.global_mean_.shape[0] == id_features.shape[1]:
        mean, std = stats.global_mean_, stats.feature_std_  # all training data, streamed at fit time
    else:
        mean, std = id_features.mean(axis=0, dtype=np.float64), id_features.std(axis=0, dtype=np.float64)
    counts = next(iter(bundle.layers.values())).counts_.astype(np.float64)
    return DriftReference(
        score_quantiles=[float(q) for q in reference_quantiles(id_scores, DRIFT_QUANTILES)],
        class_priors=[float(p) for p in counts / counts.sum()],
        feature_mean=[float(v) for v in mean],
        feature_std=[float(v) for v in std],
    )


def calibrate_and_stamp(
    graph: onnx.ModelProto,
    session,
    bundle: StatisticsBundle,
    calibration_x: np.ndarray,
    *,
    score: str,
    tpr: float,
    classes: list[str],
    input_shape: list[int],
    input_scale: float,
    name: str,
    run_id: str = "",
    extra: dict | None = None,
    calibration_y: np.ndarray | None = None,
) -> tuple[onnx.ModelProto, float, float, dict | None]:
    """(the stamped model, its threshold, its temperature, the held-out ECE before/after or None).

    The threshold keeps `tpr` of the held-out ID inputs `calibration_x` under the finished graph's
    own scores (run on `session`), which also give the drift reference's score quantiles. With the
    inputs' labels `calibration_y`, the softmax temperature is fitted on the graph's held-out logits
    and set in the graph (`fit_calibration`, `set_temperature`); without them T stays 1. Never fed
    OOD data."""
    if len(calibration_x) < 2:
        raise DataError(f"the calibration split holds {len(calibration_x)} inputs; at least 2 are needed for a threshold")
    id_scores, id_features, id_logits = run_batched(
        session, calibration_x.astype(np.float32, copy=False), ["ood_score", "features", "logits"]
    )
    id_scores = id_scores.astype(np.float64)
    threshold = calibrate_threshold(id_scores, tpr)
    temperature, calibration_error = 1.0, None
    if calibration_y is not None:
        if len(calibration_y) != len(calibration_x):
            raise DataError(f"got {len(calibration_x)} calibration inputs but {len(calibration_y)} labels")
        temperature, calibration_error = fit_calibration(id_logits.astype(np.float64), np.asarray(calibration_y))
        # float32, as the graph stores it, so the metadata says exactly what the graph divides by
        temperature = float(np.float32(temperature))
        set_temperature(graph, temperature)
    metadata = ModelMetadata(
        name=name,
        classes=list(classes),
        input_shape=[int(d) for d in input_shape],
        input_scale=float(input_scale),
        score=score,
        threshold=threshold,
        tpr=float(tpr),
        drift_reference=drift_reference(bundle, id_scores, id_features),
        statistics_checksum=bundle.checksum(),
        run_id=run_id,
        extra={
            "calibration_inputs": int(len(calibration_x)),
            "calibration_error": calibration_error or "temperature not fitted: the calibration inputs came without labels",
            **(extra or {}),
        },
        temperature=temperature,
    )
    return stamp(graph, metadata), threshold, temperature, calibration_error
