"""DualHeadModel -> one self-contained ONNX file with logits, probabilities, OOD score and features.

Exporter: torch.onnx's dynamo exporter (`torch.export` + onnxscript), called without a file so
the ONNXProgram stays in memory and its weights are ordinary initializers: nothing can end up in
a separate external-data file. It is the maintained path (the TorchScript exporter, `dynamo=False`,
is deprecated), takes a named dynamic batch axis (`Dim("N")`), writes opset 18+ with IR version
10 (which ONNX Runtime 1.31 reads) and runs onnxscript's optimizer (constant folding, dead-code
removal), which gives a graph of plain ops with no functions. Input normalization is a buffer of
the model, so it is inside the graph.

Then the chosen score (export.score_graph) and a softmax are appended, the graph is checked
against torch and the NumPy reference (export.parity; a mismatch raises ModelError), the
threshold is calibrated on held-out ID data with the graph's own scores, the softmax temperature
is fitted on the same held-out data when its labels are given (`calibration_y`; Guo et al. 2017,
ncguard.temperature), and the metadata of DESIGN.md section 3 is stamped before `save_model` writes the file atomically. Those finishing
steps are torch-free and shared with `ncguard fit` (export.finish).

The fused score (ncguard.scores.fused) reads several layers: the network then outputs their
concatenation (in `Fused.layers_` order) as the score features, and its components' mu and sigma
come from the held-out calibration inputs before the threshold is calibrated on the fused score.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import torch

from export.detectors import DETECTION_LAYER, FUSED, TRANSFER_LAYER, fit_detector, fit_fused, fused_components
from export.finish import ExportReport, calibrate_and_stamp, finish_contract, parity_inputs
from export.parity import ParityResult, compare, compare_logits, compare_scores
from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.model_file import INPUT_NAME
from ncguard.runtime import open_session, run_batched
from ncguard.scores.fused import component_layers
from ncguard.stats import StatisticsBundle
from training.inference import collect_layer_features
from training.model import DualHeadModel

__all__ = ["ExportReport", "check_parity", "export_model", "finish_graph", "parity_inputs", "torch_outputs", "torch_to_onnx"]

log = logging.getLogger("ncguard.export")

ORT_MAX_IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; ONNX Runtime 1.31 reads up to 13
SCORE_FEATURES = "ncguard/score_features"


class _ExportView(torch.nn.Module):
    """What the graph needs from the model: logits, transfer features and the score's layer.

    `layer` is one layer name, None (a logit-only score), or a tuple of layers (the fused score):
    then the score features are their concatenation, in that order, as `Fused.layers_` reads them.
    """

    def __init__(self, model: DualHeadModel, layer: str | tuple[str, ...] | None):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, x: torch.Tensor):
        if isinstance(self.layer, tuple):
            layers = self.model.layer_features(x)
            return layers["logits"], layers[TRANSFER_LAYER], torch.cat([layers[name] for name in self.layer], dim=1)
        if self.layer in (None, TRANSFER_LAYER, DETECTION_LAYER):
            out = self.model(x)
            if self.layer == DETECTION_LAYER:
                return out.logits, out.transfer, out.detection
            return out.logits, out.transfer
        layers = self.model.layer_features(x)
        return layers["logits"], layers[TRANSFER_LAYER], layers[self.layer]


def _view_outputs(layer: str | tuple[str, ...] | None) -> list[str]:
    names = ["logits", "features"]
    if layer not in (None, TRANSFER_LAYER):
        names.append(SCORE_FEATURES)
    return names


def torch_to_onnx(model: DualHeadModel, layer: str | tuple[str, ...] | None) -> onnx.ModelProto:
    """The network alone: input -> logits, features (h) and, when the score reads it, the score's layer."""
    view = _ExportView(model, layer).eval()
    example = torch.zeros((2, *model.input_shape), dtype=torch.float32)
    exporter_log = logging.getLogger("torch.onnx")
    previous_level = exporter_log.level
    with warnings.catch_warnings(), torch.no_grad():
        # torch.export's notes on its own internals (and on torchvision ops we never use) are not
        # actionable for a user; real failures still raise.
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                view,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=_view_outputs(layer),
                dynamic_shapes={"x": {0: torch.export.Dim("N", min=1)}},
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # torch.export raises many types; the user needs the message, not the trace
            raise ModelError(f"torch.onnx could not export the model: {exc}") from exc
        finally:
            exporter_log.setLevel(previous_level)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
    return proto


def finish_graph(network: onnx.ModelProto, detector, layer: str | tuple[str, ...] | None) -> onnx.ModelProto:
    """Append softmax and the OOD score (export.finish), reading the score's layer from its tensor."""
    features = None if layer is None else ("features" if layer == TRANSFER_LAYER else SCORE_FEATURES)
    return finish_contract(network, detector, features)


def torch_outputs(model: DualHeadModel, x: np.ndarray, layer: str | tuple[str, ...] | None, batch_size: int = 512) -> dict[str, np.ndarray]:
    """logits, features (h) and the score layer's features from torch eager, float32."""
    view = _ExportView(model, layer).eval()
    names = _view_outputs(layer)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            outputs = view(torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)))
            for name, value in zip(names, outputs):
                parts[name].append(value.float().cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def check_parity(session, model: DualHeadModel, detector, layer: str | tuple[str, ...] | None, x: np.ndarray) -> list[ParityResult]:
    """Graph (ONNX Runtime) vs torch logits, labels and features, and vs the NumPy score on torch's features."""
    reference = torch_outputs(model, x, layer)
    logits, features, ood_score = run_batched(session, x, ["logits", "features", "ood_score"])
    score_features = reference.get(SCORE_FEATURES, reference["features"]) if layer else None
    reference_scores = detector.score(features=score_features, logits=reference["logits"])
    return [
        compare_logits(reference["logits"], logits),
        compare("the transfer features", reference["features"], features),
        compare_scores(detector.name, reference_scores, ood_score, width=None if score_features is None else score_features.shape[1]),
    ]


def export_model(
    model: DualHeadModel,
    bundle: StatisticsBundle,
    calibration_x: np.ndarray,
    *,
    score: str,
    tpr: float = 0.95,
    layer: str | None = None,
    provider: str | None = None,
    name: str = "ncguard-model",
    run_id: str = "",
    input_scale: float = 1.0,
    extra: dict | None = None,
    components=None,
    combine: str = "sum",
    calibration_y: np.ndarray | None = None,
) -> tuple[onnx.ModelProto, ExportReport]:
    """The stamped ONNX model (not yet written) and what the export checked.

    `calibration_x` is held-out ID data (never OOD data): the threshold keeps `tpr` of it, and the
    drift reference's score quantiles come from it; for score "fused" its layer features also give
    each component's mu and sigma (`components`/`combine` as export.detectors.fused_components).
    `calibration_y`, its labels, fits the temperature of `probabilities`; without them T = 1 (the
    raw softmax, which for the ETF head is far from calibrated).
    """
    if len(calibration_x) < 2:
        raise DataError(f"the calibration split holds {len(calibration_x)} inputs; at least 2 are needed for a threshold")
    if tuple(calibration_x.shape[1:]) != tuple(model.input_shape):
        raise DataError(f"calibration inputs have shape {list(calibration_x.shape[1:])}, the model takes {list(model.input_shape)}")
    if list(bundle.classes) and len(bundle.classes) != model.n_classes:
        raise ModelError(f"the statistics name {len(bundle.classes)} classes but the model has {model.n_classes}")
    model = model.eval()
    score_extra: dict = {}
    if score == FUSED:
        if layer is not None:
            raise ConfigError("--layer does not apply to --score fused: name the layers in --components")
        detector = fit_fused_on_held_out(model, bundle, calibration_x, components, combine)
        layer = detector.layers_
        score_extra = {"fused": detector.describe()}
    else:
        if components is not None:
            raise ConfigError(f"--components applies to the fused score only, not to {score!r}")
        detector, layer = fit_detector(score, bundle, layer)
    log.info("exporting with score %s on layer %s", score, _layer_text(layer))
    graph = finish_graph(torch_to_onnx(model, layer), detector, layer)
    session = open_session(graph.SerializeToString(), provider=provider)
    providers = list(session.get_providers())
    log.info("parity and calibration run on ONNX Runtime providers %s", ", ".join(providers))
    parity = check_parity(session, model, detector, layer, parity_inputs(calibration_x))

    if calibration_y is None:
        log.warning("no labels for the calibration inputs: the probabilities keep temperature 1 (not calibrated)")
    proto, threshold, temperature, calibration_error = calibrate_and_stamp(
        graph,
        session,
        bundle,
        calibration_x,
        score=score,
        tpr=tpr,
        classes=[str(c) for c in bundle.classes] or [str(i) for i in range(model.n_classes)],
        input_shape=list(model.input_shape),
        input_scale=input_scale,
        name=name,
        run_id=run_id,
        extra={
            "score_layer": list(layer) if isinstance(layer, tuple) else layer,
            **score_extra,
            "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
            "parity": [r.describe() for r in parity],
            **(extra or {}),
        },
        calibration_y=calibration_y,
    )
    report = ExportReport(score, _layer_text(layer) if layer else None, threshold, providers, parity, temperature, calibration_error)
    return proto, report


def _layer_text(layer: str | tuple[str, ...] | None) -> str:
    if isinstance(layer, tuple):
        return "+".join(layer)
    return layer or "logits"


def fit_fused_on_held_out(model: DualHeadModel, bundle: StatisticsBundle, calibration_x: np.ndarray, components=None, combine: str = "sum"):
    """The fused detector, standardized on the held-out ID inputs' features as torch computes them."""
    components = fused_components(bundle, components, combine)  # clear errors before the data pass
    layers = component_layers(components)
    calibration = collect_layer_features(model, calibration_x, (*layers, "logits"))
    logits = calibration.pop("logits")
    return fit_fused(bundle, components, combine, calibration, logits)
