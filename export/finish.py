"""The one pipeline every ncguard model goes through, whatever produced its network (torch-free).

`ncguard export` (a trained DualHeadModel, export.torch_export) and `ncguard fit` (an existing
ONNX classifier, export.byom) both hand `finish_model` a fitted detector and a network graph with
input `input`, outputs `logits` and `features`, and a tensor for every layer the detector reads,
plus a way to compute the reference values (torch, or the bare network) of those tensors. From
there the model is finished the same way: softmax and the OOD score appended with the outputs in
the contract's order (`finish_contract`), one ONNX Runtime session, the parity check against the
reference and the detector's NumPy formula (`check_parity`), the threshold calibrated on held-out
ID data with the graph's own scores (`Detector.calibrate`), the softmax temperature fitted on the
same held-out data when its labels are given (ncguard.temperature, Guo et al. 2017), and the
metadata of DESIGN.md section 3 (drift reference and temperature included) stamped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.parity import ParityResult, compare, compare_logits, compare_scores
from export.score_graph import append_ood_head
from ncguard.calibration import expected_calibration_error
from ncguard.drift import reference_quantiles
from ncguard.errors import DataError, ModelError
from ncguard.model_file import COMPONENTS_OUTPUT, OUTPUT_NAMES, DriftReference, ModelMetadata, stamp
from ncguard.runtime import open_session, run_batched
from ncguard.scores import LOGITS, Detector
from ncguard.stats import StatisticsBundle
from ncguard.temperature import fit_temperature, softmax

log = logging.getLogger("ncguard.export")
TRANSFER_LAYER = "transfer"  # the statistics layer of the `features` output (h; a foreign model's features)

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


def finish_contract(network: onnx.ModelProto, detector: Detector, tensors: Mapping[str, str]) -> onnx.ModelProto:
    """Append softmax(logits / T), the OOD score and its parts (`ood_components`) to a network with
    outputs `logits` and `features`.

    `tensors` maps each layer the detector reads (`detector.layers`) to its tensor. The result
    has exactly the contract's outputs, in their order. `network` gains the softmax nodes (it is
    not copied first: models can be large, and append_ood_head copies it anyway). T is the
    initializer TEMPERATURE_TENSOR, 1 until `finish_model` fits it (`set_temperature`);
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
    model = append_ood_head(network, detector, tensors, output="ood_score", components_output=COMPONENTS_OUTPUT)
    by_name = {o.name: o for o in model.graph.output}
    ordered = [by_name[name] for name in (*OUTPUT_NAMES, COMPONENTS_OUTPUT)]
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


def feature_layers(detector: Detector) -> list[str]:
    """The feature layers a detector reads (its `layers` without the logits)."""
    return [layer for layer in detector.layers if layer != LOGITS]


def check_parity(session, detector: Detector, reference: Mapping[str, np.ndarray], x: np.ndarray) -> list[ParityResult]:
    """The finished graph (ONNX Runtime) against the reference on inputs `x`: logits and labels, the
    `features` output, and the OOD score against the detector's NumPy formula on the reference's
    own features. `reference` holds "logits", "features" and every layer the detector reads."""
    logits, features, ood_score, components = run_batched(session, x, ["logits", "features", "ood_score", COMPONENTS_OUTPUT])
    width = sum(int(reference[layer].shape[1]) for layer in feature_layers(detector)) or None
    mapping = {layer: reference[layer] for layer in detector.layers}
    results = [
        compare_logits(reference[LOGITS], logits),
        compare("the features", reference["features"], features),
        compare_scores(detector.name, detector.score(mapping), ood_score, width=width),
    ]
    names = detector.component_names()
    if components.shape != (len(x), len(names)):
        raise ModelError(f"parity check failed for the OOD components: shape {components.shape} from the graph, {(len(x), len(names))} expected")
    if len(names) > 1:
        # each part on its own score's scale ((z * sigma + mu) = the component's raw score), where
        # its own tolerance applies; a single score's one part is the score, checked above
        raw = detector.component_scores(mapping) * detector.sigma_ + detector.mu_
        graph_raw = components.astype(np.float64) * detector.sigma_ + detector.mu_
        for k, name in enumerate(names):
            layer, score = name.split(":", 1)
            results.append(compare_scores(score, raw[:, k], graph_raw[:, k], width=int(reference[layer].shape[1]) if layer in reference else None))
    return results


def finish_model(
    network: onnx.ModelProto,
    detector: Detector,
    tensors: Mapping[str, str],
    reference: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    bundle: StatisticsBundle,
    calibration_x: np.ndarray,
    calibration_y: np.ndarray | None,
    *,
    tpr: float,
    provider: str | None,
    classes: list[str],
    input_shape: list[int],
    input_scale: float,
    name: str,
    run_id: str = "",
    extra: dict | None = None,
    seed: int = 0,
) -> tuple[onnx.ModelProto, ExportReport]:
    """(the stamped model, not yet written; what was checked): the pipeline of the module docstring.

    `detector` is fitted; `tensors` maps its layers to the network's tensors; `reference(x)` gives
    {"logits", "features", every layer the detector reads} as the source model computes them.
    `calibration_x` are held-out ID inputs (never OOD data): the threshold keeps `tpr` of them under
    the finished graph's own scores, which also give the drift reference's score quantiles. Their
    labels `calibration_y` fit the softmax temperature; without them T stays 1.
    """
    if len(calibration_x) < 2:
        raise DataError(f"the calibration split holds {len(calibration_x)} inputs; at least 2 are needed for a threshold")
    if calibration_y is not None and len(calibration_y) != len(calibration_x):
        raise DataError(f"got {len(calibration_x)} calibration inputs but {len(calibration_y)} labels")
    graph = finish_contract(network, detector, tensors)
    session = open_session(graph.SerializeToString(), provider=provider)
    providers = list(session.get_providers())
    log.info("parity and calibration run on ONNX Runtime providers %s", ", ".join(providers))
    check_x = parity_inputs(calibration_x, seed)
    parity = check_parity(session, detector, reference(check_x), check_x)

    id_scores, id_features, id_logits = run_batched(
        session, calibration_x.astype(np.float32, copy=False), ["ood_score", "features", "logits"]
    )
    id_scores = id_scores.astype(np.float64)
    detector.calibrate(id_scores, tpr)
    temperature, calibration_error = 1.0, None
    if calibration_y is None:
        log.warning("no labels for the calibration inputs: the probabilities keep temperature 1 (not calibrated)")
    else:
        temperature, calibration_error = fit_calibration(id_logits.astype(np.float64), np.asarray(calibration_y))
        # float32, as the graph stores it, so the metadata says exactly what the graph divides by
        temperature = float(np.float32(temperature))
        set_temperature(graph, temperature)
    layers = feature_layers(detector)
    described = detector.describe()
    metadata = ModelMetadata(
        name=name,
        classes=list(classes),
        input_shape=[int(d) for d in input_shape],
        input_scale=float(input_scale),
        score=detector.name,
        threshold=detector.threshold_,
        tpr=detector.tpr_,
        drift_reference=drift_reference(bundle, id_scores, id_features),
        statistics_checksum=bundle.checksum(),
        run_id=run_id,
        extra={
            "calibration_inputs": int(len(calibration_x)),
            "calibration_error": calibration_error or "temperature not fitted: the calibration inputs came without labels",
            "score_layer": layers if len(layers) > 1 else (layers[0] if layers else None),
            **({detector.name: described} if described else {}),
            "parity": [r.describe() for r in parity],
            **(extra or {}),
        },
        temperature=temperature,
        ood_components=detector.component_names(),
    )
    report = ExportReport(detector.name, "+".join(layers) or None, detector.threshold_, providers, parity, temperature, calibration_error)
    return stamp(graph, metadata), report
