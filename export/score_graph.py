"""Appending a detector's OOD score to any ONNX graph that holds its features and logits (torch-free).

Serves both `ncguard export` and bring-your-own-model wrapping. The score's nodes come from the
detector itself (`Detector.build_graph`, written next to its NumPy formula in `ncguard/scores/`);
this module finds the tensors it reads in a model that may not be ncguard's, flattens them to
[N, width] float32 matrices, and adds the `ood_score` output.
"""

from __future__ import annotations

import copy
from typing import Mapping

import onnx
from onnx import TensorProto, helper

from ncguard.errors import ConfigError, ModelError
from ncguard.scores import LOGITS, Detector
from ncguard.scores.graph import MIN_OPSET, GraphBuilder, all_names


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("the model imports no default-domain (ai.onnx) opset")


def _tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of every tensor shape inference can work out (graph inputs, outputs, intermediates)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot follow still gets its declared types
        inferred = model
    graph = inferred.graph
    return {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}


def _as_float_matrix(b: GraphBuilder, name: str, types: dict, what: str) -> str:
    """Flatten to [N, width] and cast to float32 when the tensor is another type (e.g. float16).

    A tensor shape inference already knows to be [N, width] is used as it is: at batch 1 every node
    costs a few microseconds whatever it computes, and a Flatten of a matrix computes nothing.
    """
    tensor_type = types[name].tensor_type if name in types else None
    elem = tensor_type.elem_type if tensor_type is not None else TensorProto.FLOAT
    if elem not in (TensorProto.FLOAT, TensorProto.UNDEFINED):
        if elem not in (TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            raise ModelError(f"{what} tensor {name!r} has type {TensorProto.DataType.Name(elem)}, not a float type")
        name = b.node("Cast", [name], f"{what}_float", to=TensorProto.FLOAT)
    if tensor_type is not None and tensor_type.HasField("shape") and len(tensor_type.shape.dim) == 2:
        return name
    return b.node("Flatten", [name], f"{what}_matrix", axis=1)


def _batch_dim(model: onnx.ModelProto, *tensors: str, types: dict) -> onnx.TensorShapeProto.Dimension:
    for name in tensors:
        if name and name in types and types[name].tensor_type.HasField("shape") and types[name].tensor_type.shape.dim:
            return copy.deepcopy(types[name].tensor_type.shape.dim[0])
    dim = onnx.TensorShapeProto.Dimension()
    dim.dim_param = "N"
    return dim


def _name_output(graph: onnx.GraphProto, builder: GraphBuilder, first_ours: int, tensor: str, name: str) -> None:
    """Make `tensor` available as the graph output `name`: renamed where the score's own nodes (those
    from index `first_ours` on) made it, since an Identity copy is one more node, a few microseconds per
    call at batch 1; else copied by an Identity (a tensor of the original model keeps its name for
    whatever else reads it)."""
    ours = graph.node[first_ours:]
    if not any(tensor in node.output for node in ours):
        graph.node.append(helper.make_node("Identity", [tensor], [name], name=builder.fresh("output")))
        return
    for node in ours:  # only the score's nodes can read a tensor the score's nodes made
        for names in (node.input, node.output):
            for i, value in enumerate(names):
                if value == tensor:
                    names[i] = name


def append_ood_head(
    model: onnx.ModelProto,
    detector: Detector,
    inputs: Mapping[str, str] | None = None,
    *,
    features: str | None = None,
    logits: str | None = None,
    output: str = "ood_score",
    components_output: str | None = "ood_components",
) -> onnx.ModelProto:
    """A copy of `model` with a graph output `output` (float32 [N]) holding `detector`'s score, and
    `components_output` (float32 [N, K]) its parts (`Detector.component_scores`; None: no such output).

    `inputs` maps each layer the detector reads (`detector.layers`, "logits" among them) to an
    existing tensor of the graph (an input, output or intermediate); `features=` names the tensor of
    a detector that reads one feature layer and `logits=` the logits, as a shorthand. Tensors of any
    rank are flattened to [N, width], and float16/float64 ones are cast to float32, so this works
    on graphs not written by ncguard.
    """
    if detector.needs_fit and not getattr(detector, "fitted_", False):
        raise ConfigError(f"the {detector.name!r} detector must be fitted before it can be exported")
    tensors = dict(inputs or {})
    if features is not None:
        feature_layers = [layer for layer in detector.layers if layer != LOGITS]
        if len(feature_layers) > 1:
            raise ConfigError(f"the {detector.name!r} score reads several layers ({', '.join(feature_layers)}): map each to its tensor")
        tensors.update(dict.fromkeys(feature_layers, features))
    if logits is not None:
        tensors[LOGITS] = logits
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(
            f"the model uses opset {opset}; the OOD head needs opset {MIN_OPSET} or newer "
            "(convert it with onnx.version_converter.convert_version first)"
        )
    model = copy.deepcopy(model)
    graph = model.graph
    known = all_names(graph)
    for name in (output, components_output):
        if name is not None and (name in {o.name for o in graph.output} or name in known):
            raise ModelError(f"the model already has a tensor named {name!r}; choose another output name")
    types = _tensor_types(model)
    builder = GraphBuilder(graph, opset)
    first_ours = len(graph.node)
    matrices = {}
    for layer in detector.layers:
        what = "logits" if layer == LOGITS else "features"
        tensor = tensors.get(layer)
        if not tensor:
            raise ConfigError(f"the {detector.name!r} score reads {what} (layer {layer!r}): name the tensor that holds them")
        if tensor not in known:
            raise ModelError(f"the model has no tensor named {tensor!r} to read {what} from")
        matrices[layer] = _as_float_matrix(builder, tensor, types, what if layer == LOGITS else layer)
    score, components = detector.build_component_graph(builder, matrices)
    batch = _batch_dim(model, *tensors.values(), types=types)
    for tensor, name, width in ((score, output, None), (components, components_output, len(detector.component_names()))):
        if name is None:
            continue
        _name_output(graph, builder, first_ours, tensor, name)
        value = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        value.type.tensor_type.shape.dim.append(copy.deepcopy(batch))
        if width is not None:
            value.type.tensor_type.shape.dim.add().dim_value = width
        graph.output.append(value)
    return model
