"""DualHeadModel -> one self-contained ONNX file with logits, probabilities, OOD score and features.

Exporter: torch.onnx's dynamo exporter (`torch.export` + onnxscript), called without a file so
the ONNXProgram stays in memory and its weights are ordinary initializers: nothing can end up in
a separate external-data file. It is the maintained path (the TorchScript exporter, `dynamo=False`,
is deprecated), takes a named dynamic batch axis (`Dim("N")`), writes opset 18+ with IR version
10 (which ONNX Runtime 1.31 reads) and runs onnxscript's optimizer (constant folding, dead-code
removal), which gives a graph of plain ops with no functions. Input normalization is a buffer of
the model, so it is inside the graph.

The detector comes from `ncguard.scores.build_detector` and is fitted by
`training.inference.fit_on_held_out` (the one place every torch path fits a run's detector: the
fused score's mu and sigma come from the held-out calibration inputs). The network outputs, besides
the logits and the transfer features, every other layer the detector reads (`detector.layers`),
each as its own tensor. The rest is `export.finish.finish_model`, shared with `ncguard fit`: score
and softmax appended, parity against torch and the NumPy formula (a mismatch raises ModelError),
threshold calibrated on the graph's own held-out scores, temperature fitted, metadata stamped,
before `save_model` writes the file atomically.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import torch

from export.finish import ExportReport, TRANSFER_LAYER, check_parity as check_graph_parity, finish_contract, finish_model, parity_inputs
from export.parity import ParityResult
from ncguard.errors import DataError, ModelError
from ncguard.model_file import INPUT_NAME
from ncguard.scores import LOGITS, Detector, build_detector
from ncguard.stats import StatisticsBundle
from training.inference import fit_on_held_out
from training.model import DualHeadModel

__all__ = ["ExportReport", "check_parity", "export_model", "finish_graph", "parity_inputs", "torch_outputs", "torch_to_onnx"]

log = logging.getLogger("ncguard.export")

ORT_MAX_IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; ONNX Runtime 1.31 reads up to 13
SCORE_FEATURES = "ncguard/score_features"  # prefix of the network's output for each further layer a score reads
DETECTION_LAYER = "detection"


def _extra_layers(layers) -> tuple[str, ...]:
    """The layers a score reads beyond what the network always outputs (logits, transfer features)."""
    return tuple(layer for layer in dict.fromkeys(layers or ()) if layer not in (LOGITS, TRANSFER_LAYER))


def network_tensors(layers) -> dict[str, str]:
    """{layer: tensor of the `torch_to_onnx` network holding it} for the logits, h and `layers`."""
    return {LOGITS: "logits", TRANSFER_LAYER: "features", **{layer: f"{SCORE_FEATURES}/{layer}" for layer in _extra_layers(layers)}}


class _ExportView(torch.nn.Module):
    """What the graph needs from the model: logits, transfer features and each further layer a score reads."""

    def __init__(self, model: DualHeadModel, layers: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, x: torch.Tensor):
        if set(self.layers) <= {DETECTION_LAYER}:  # the plain forward pass has them
            out = self.model(x)
            return (out.logits, out.transfer, *([out.detection] if self.layers else []))
        layers = self.model.layer_features(x)
        return (layers[LOGITS], layers[TRANSFER_LAYER], *(layers[name] for name in self.layers))


def torch_to_onnx(model: DualHeadModel, layers=None) -> onnx.ModelProto:
    """The network alone: input -> logits, features (h) and every other layer in `layers` (a detector's)."""
    extra = _extra_layers(layers)
    view = _ExportView(model, extra).eval()
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
                output_names=list(network_tensors(extra).values()),
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


def finish_graph(network: onnx.ModelProto, detector: Detector) -> onnx.ModelProto:
    """Append softmax and the OOD score (export.finish) to a `torch_to_onnx` network made for `detector`."""
    return finish_contract(network, detector, network_tensors(detector.layers))


def torch_outputs(model: DualHeadModel, x: np.ndarray, layers=None, batch_size: int = 512) -> dict[str, np.ndarray]:
    """{"logits", "features" (h, also as "transfer"), every other layer in `layers`} from torch eager, float32."""
    extra = _extra_layers(layers)
    view = _ExportView(model, extra).eval()
    names = [LOGITS, TRANSFER_LAYER, *extra]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            outputs = view(torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)))
            for name, value in zip(names, outputs):
                parts[name].append(value.float().cpu().numpy())
    result = {name: np.concatenate(values) for name, values in parts.items()}
    result["features"] = result[TRANSFER_LAYER]
    return result


def check_parity(session, model: DualHeadModel, detector: Detector, x: np.ndarray) -> list[ParityResult]:
    """Graph (ONNX Runtime) vs torch logits, labels and features, and vs the NumPy score on torch's features."""
    return check_graph_parity(session, detector, torch_outputs(model, x, detector.layers), x)


def export_model(
    model: DualHeadModel,
    bundle: StatisticsBundle,
    calibration_x: np.ndarray,
    *,
    score: str | None = None,
    tpr: float = 0.95,
    layer: str | None = None,
    provider: str | None = None,
    name: str = "ncguard-model",
    run_id: str = "",
    input_scale: float = 1.0,
    extra: dict | None = None,
    components=None,
    combine: str | None = None,
    calibration_y: np.ndarray | None = None,
    detector: Detector | None = None,
) -> tuple[onnx.ModelProto, ExportReport]:
    """The stamped ONNX model (not yet written) and what the export checked.

    `score` None: the default of the model's head (ncguard.scores.defaults); `layer`, `components`
    and `combine` as `ncguard.scores.build_detector`. `calibration_x` is held-out ID data (never OOD
    data): the threshold keeps `tpr` of it, the drift reference's score quantiles come from it, and
    for "fused" its features standardize the components. `calibration_y`, its labels, fits the
    temperature of `probabilities`; without them T = 1 (the raw softmax, which for the ETF head is
    far from calibrated). `detector`: an unfitted one from `build_detector` instead of the above.
    """
    if tuple(calibration_x.shape[1:]) != tuple(model.input_shape):
        raise DataError(f"calibration inputs have shape {list(calibration_x.shape[1:])}, the model takes {list(model.input_shape)}")
    if list(bundle.classes) and len(bundle.classes) != model.n_classes:
        raise ModelError(f"the statistics name {len(bundle.classes)} classes but the model has {model.n_classes}")
    model = model.eval()
    if detector is None:
        detector = build_detector(score, bundle, layer=layer, components=components, combine=combine, head=model.head)
    fit_on_held_out(detector, bundle, model, calibration_x)
    log.info("exporting with score %s on layers %s", detector.name, ", ".join(detector.layers))
    return finish_model(
        torch_to_onnx(model, detector.layers),
        detector,
        network_tensors(detector.layers),
        lambda x: torch_outputs(model, x, detector.layers),
        bundle,
        calibration_x,
        calibration_y,
        tpr=tpr,
        provider=provider,
        classes=[str(c) for c in bundle.classes] or [str(i) for i in range(model.n_classes)],
        input_shape=list(model.input_shape),
        input_scale=input_scale,
        name=name,
        run_id=run_id,
        extra={"exporter": f"torch.onnx dynamo (torch {torch.__version__})", **(extra or {})},
    )
