"""Reshaping an existing ONNX classifier for `ncguard fit` (torch-free).

What a foreign graph needs before ncguard can finish it (export.finish): one input named `input`
taking the readers' float32 [N, *shape] data (with the model's own scaling and dtype applied in
the graph), an output `logits` [N, C], and one named layer per features tensor the user names (a
graph output, an intermediate tensor, or a node, meaning its first output). The last one named is
the contract's `features` output; the layers before it (`--features A,B,C`: early blocks) are read
by a multi-layer score.

Two stages, so the NumPy side can check the graph: `build_network` exposes each features tensor as
it is (cast to float32; `Network.raw`), and ncguard fit reads it through NumPy, flattened or, for a
feature map, pooled per channel (ncguard.pooling); `Network.finished` then writes the same
flattening or pooling as nodes, giving the detector one named [N, D] tensor per layer, and the
parity check of export.finish holds the graph to the NumPy values. Everything is done with the onnx
library: shape inference for shapes, helper nodes for the new edges.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.graph_reading import (
    FLOAT_TYPES, check_layer, check_matrix, elem_type_name, format_shape, graph_inputs, logits_candidate, resolve_tensor, shape_of, subgraphs, tensor_names,
)
from export.score_graph import _tensor_types, default_opset
from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.model_file import INPUT_NAME, OUTPUT_NAMES
from ncguard.pooling import channel_mean_std_graph
from ncguard.scores.graph import MIN_OPSET, GraphBuilder

PREFIX = "ncguard_byom"
PROBE_SUFFIX = "_shape"  # extra output holding the raw shape of the logits tensor
FEATURES_OUTPUT = "features"  # the contract's output: the last features layer


# ---------------------------------------------------------------------- input transform


@dataclass(frozen=True)
class InputTransform:
    """How the model wants its input, given the readers' float32 data (pixels in [0, 1]).

    model input = (scale * x - mean) / std, then cast to the model's input dtype (integer types
    are rounded and clipped to their range, e.g. scale 255 for a model taking uint8 pixels).
    mean and std hold one value, or one per channel (images [C, H, W]) / per feature (vectors [D]).
    """

    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def check(self, input_shape: tuple[int, ...]) -> "InputTransform":
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise ConfigError(f"--input-scale must be a positive number, got {self.scale!r}")
        for flag, values in (("--input-mean", self.mean), ("--input-std", self.std)):
            if len(values) not in (1, input_shape[0]) or not np.all(np.isfinite(values)):
                raise ConfigError(
                    f"{flag} needs one finite value or one per channel/feature ({input_shape[0]} for inputs of shape "
                    f"{list(input_shape)}), got {list(values)}"
                )
        if min(self.std) <= 0:
            raise ConfigError(f"--input-std values must be positive, got {list(self.std)}")
        return self

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and not any(self.mean) and all(s == 1.0 for s in self.std)

    def as_dict(self) -> dict:
        return {"scale": float(self.scale), "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}


def _broadcastable(values: tuple[float, ...], input_shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.size == 1:
        return array.reshape(())
    return array.reshape((array.size,) + (1,) * (len(input_shape) - 1))


def _add_input_transform(b: GraphBuilder, transform: InputTransform, input_shape, target_elem: int) -> str:
    x = INPUT_NAME
    if transform.scale != 1.0:
        x = b.node("Mul", [x, b.constant("input_scale", transform.scale)], "scaled")
    if any(transform.mean):
        x = b.node("Sub", [x, b.constant("input_mean", _broadcastable(transform.mean, input_shape))], "centred")
    if any(s != 1.0 for s in transform.std):
        x = b.node("Div", [x, b.constant("input_std", _broadcastable(transform.std, input_shape))], "standardised")
    if target_elem in (TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
        x = b.node("Cast", [x], "cast_input", to=target_elem)
    elif target_elem != TensorProto.FLOAT:
        dtype = helper.tensor_dtype_to_np_dtype(target_elem)
        if not np.issubdtype(dtype, np.integer):
            raise ModelError(f"the model's input has type {dtype}; ncguard can feed float or integer inputs only")
        info = np.iinfo(dtype)
        low, high = b.constant("input_min", float(info.min)), b.constant("input_max", float(info.max))
        x = b.node("Cast", [b.node("Round", [b.node("Clip", [x, low, high], "clipped")], "rounded")], "cast_input", to=target_elem)
    return x


# ---------------------------------------------------------------------- surgery


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a value everywhere it appears, subgraphs included (ONNX names are never shadowed)."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new
    for sparse in graph.sparse_initializer:
        for tensor in (sparse.values, sparse.indices):
            if tensor.name == old:
                tensor.name = new
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
        for sub in subgraphs(node):
            _rename(sub, old, new)


def _outer_references(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read (some from the enclosing graph)."""
    names: set[str] = set()
    for sub in subgraphs(node):
        for inner in sub.node:
            names.update(inner.input)
            names |= _outer_references(inner)
    return names


def prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes, initializers and value infos no graph output depends on.

    The original outputs the contract does not keep (e.g. a softmax, an auxiliary head) would
    otherwise still be computed and their weights shipped. Written here because onnx.utils.Extractor
    does not follow names read from inside subgraphs (If/Loop bodies).
    """
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed |= _outer_references(node)
    nodes = list(reversed(kept))
    del graph.node[:]
    graph.node.extend(nodes)
    for container in (graph.initializer, graph.value_info):
        keep = [item for item in container if item.name in needed]
        del container[:]
        container.extend(keep)
    keep_inputs = [v for v in graph.input if v.name in needed or v.name == INPUT_NAME]
    del graph.input[:]
    graph.input.extend(keep_inputs)


def _batch_dim(source_input: onnx.ValueInfoProto) -> onnx.TensorShapeProto.Dimension:
    dims = source_input.type.tensor_type.shape.dim
    dim = onnx.TensorShapeProto.Dimension()
    dim.dim_param = dims[0].dim_param if dims and dims[0].HasField("dim_param") else "N"
    return dim


def _matrix_value_info(name: str, batch: onnx.TensorShapeProto.Dimension, width: int | None) -> onnx.ValueInfoProto:
    value = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    shape = value.type.tensor_type.shape
    shape.dim.append(copy.deepcopy(batch))
    dim = shape.dim.add()
    if width is not None:
        dim.dim_value = int(width)
    return value


def check_input_shape(source_input: onnx.ValueInfoProto, input_shape: tuple[int, ...], data_name: str) -> None:
    """DataError when the data's inputs do not fit the model's declared input; ModelError for a fixed batch."""
    shape = shape_of(source_input.type)
    if shape is None:
        return  # undeclared: the first batch through ONNX Runtime tells
    expected = format_shape(["N", *input_shape])
    if len(shape) != len(input_shape) + 1:
        raise DataError(
            f"the data {data_name} gives inputs of shape {expected}, but the model's input {source_input.name!r} "
            f"takes {format_shape(shape)} ({len(shape)} axes): give data shaped like the model's input (e.g. a .npz)"
        )
    if isinstance(shape[0], int) and shape[0] > 0:
        raise ModelError(
            f"the model's input {source_input.name!r} has a fixed batch size of {shape[0]} ({format_shape(shape)}); "
            "ncguard needs a dynamic batch axis: export it again with one (torch.onnx.export(..., dynamic_shapes=...) "
            "or dynamic_axes)"
        )
    for axis, (want, have) in enumerate(zip(shape[1:], input_shape), start=1):
        if isinstance(want, int) and want > 0 and want != have:
            raise DataError(
                f"the data {data_name} gives inputs of shape {expected}, but the model's input {source_input.name!r} "
                f"takes {format_shape(shape)} (axis {axis}: {want}, not {have})"
            )


@dataclass
class Network:
    """The reshaped graph: input `input`, outputs `logits` (plus its raw-shape probe) and each features
    layer's tensor as the model computes it (`raw`, float32, any shape)."""

    model: onnx.ModelProto
    source_input: str
    logits_tensor: str  # names in the original model
    feature_tensors: dict[str, str]  # layer -> tensor in the original model, the `features` output's layer last
    notes: list[str] = field(default_factory=list)
    batch_dim: onnx.TensorShapeProto.Dimension | None = None

    @property
    def features_tensor(self) -> str:
        """The original tensor behind the contract's `features` output (the last one named)."""
        return next(reversed(self.feature_tensors.values()))

    @staticmethod
    def probe(name: str) -> str:
        return f"{PREFIX}/{name}{PROBE_SUFFIX}"

    @staticmethod
    def raw(layer: str) -> str:
        """The output holding layer `layer`'s tensor unflattened (float32)."""
        return f"{PREFIX}/raw/{layer}"

    def finished(self, n_classes: int, layers: dict[str, tuple[int, bool]]) -> tuple[onnx.ModelProto, dict[str, str]]:
        """(a copy with outputs `logits` and `features` only, every layer's tensor) for export.finish.

        `layers` holds each layer's (width, pooled), as read from the data: a layer is flattened to
        [N, width], or pooled per channel (`ncguard.pooling.channel_mean_std_graph`) when pooled.
        The last layer is also the `features` output. Probes go and dead nodes are pruned; the other
        layers' tensors stay graph outputs so pruning keeps them for the detector, until
        export.finish.finish_contract keeps exactly the contract's outputs.
        """
        model = copy.deepcopy(self.model)
        graph = model.graph
        builder = GraphBuilder(graph, default_opset(model), prefix=PREFIX)
        tensors = {}
        for layer in self.feature_tensors:
            _, pooled = layers[layer]
            hint = f"layer/{layer}"
            if pooled:
                tensors[layer] = channel_mean_std_graph(builder, self.raw(layer), hint=hint)
            else:
                tensors[layer] = builder.node("Flatten", [self.raw(layer)], hint, axis=1)
        last = next(reversed(self.feature_tensors))
        graph.node.append(helper.make_node("Identity", [tensors[last]], [FEATURES_OUTPUT], name=builder.fresh("features_node")))
        tensors[last] = FEATURES_OUTPUT
        outputs = [
            _matrix_value_info("logits", self.batch_dim, n_classes),
            _matrix_value_info(FEATURES_OUTPUT, self.batch_dim, layers[last][0]),
            *(_matrix_value_info(tensors[layer], self.batch_dim, layers[layer][0]) for layer in self.feature_tensors if layer != last),
        ]
        del graph.output[:]
        graph.output.extend(outputs)
        prune(graph)
        return model, tensors


def feature_list(features) -> list[str]:
    """`--features`: one name, "A,B,C", or a sequence of names -> the list (ConfigError if empty or repeated)."""
    names = [part.strip() for part in features.split(",")] if isinstance(features, str) else [str(f).strip() for f in features]
    if not names or not all(names):
        raise ConfigError(f"--features needs tensor names, separated by commas (e.g. relu,max_pool2d,relu_1), got {features!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--features names {', '.join(repeated)} more than once")
    return names


def layer_names(count: int, last: str) -> list[str]:
    """Layer names for `count` features tensors: "block1", "block2", ... then `last` (the `features` output)."""
    return [*(f"block{i}" for i in range(1, count)), last]


def _checked_opset(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    opset = default_opset(model)
    if opset >= MIN_OPSET:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError/ValueError/ConvertError by op
        raise ModelError(
            f"the model uses opset {opset}; ncguard needs opset {MIN_OPSET} or newer and could not convert it ({exc}). "
            "Export it again with a newer opset"
        ) from None
    notes.append(f"converted the model from opset {opset} to {MIN_OPSET} (onnx.version_converter)")
    return converted


def build_network(
    model: onnx.ModelProto,
    *,
    features: dict[str, str],
    logits: str | None,
    input_shape: tuple[int, ...],
    transform: InputTransform,
    data_name: str = "data",
) -> Network:
    """The model reshaped to the contract's input, `logits`, and the raw tensor of each features layer.

    `features` maps layer names to the tensors (or nodes) the user named, the `features` output's
    layer last. The original input becomes an internal tensor fed from `input` through `transform`;
    names that collide with the contract's (`input`, `logits`, ...) are renamed first, so a model
    that already uses them keeps working. The raw shape of the logits is an extra output (a probe)
    so the first batch can check it against the flattening rule even where shape inference could
    not tell; the layers' raw tensors show their own shapes.
    """
    notes: list[str] = []
    model = _checked_opset(copy.deepcopy(model), notes)
    graph = model.graph
    inputs = graph_inputs(graph)
    if len(inputs) != 1:
        raise ModelError(
            f"the model takes {len(inputs)} inputs ({', '.join(v.name for v in inputs) or 'none'}); "
            "ncguard wraps models with exactly one input"
        )
    source = inputs[0]
    transform.check(tuple(input_shape))
    check_input_shape(source, tuple(input_shape), data_name)
    feature_tensors = {layer: resolve_tensor(model, name, "--features") for layer, name in features.items()}
    logits_tensor, logit_notes = logits_candidate(model, logits)
    notes += logit_notes
    types = _tensor_types(model)
    elems = {}
    for key, flag, tensor in (*((layer, "--features", t) for layer, t in feature_tensors.items()), ("logits", "--logits", logits_tensor)):
        shape = shape_of(types.get(tensor))
        check_matrix(tensor, shape, flag) if key == "logits" else check_layer(tensor, shape, flag)
        elems[key] = types[tensor].tensor_type.elem_type if tensor in types else TensorProto.UNDEFINED
        if elems[key] not in (*FLOAT_TYPES, TensorProto.UNDEFINED):
            raise ModelError(f"{flag} {tensor!r} holds {elem_type_name(types[tensor])} values, not floats")

    taken = tensor_names(graph)
    renamed = {}
    for name in (INPUT_NAME, *OUTPUT_NAMES):
        if name in taken:
            new = f"{PREFIX}/original/{name}"
            _rename(graph, name, new)
            renamed[name] = new
    source_name = renamed.get(source.name, source.name)
    logits_name = renamed.get(logits_tensor, logits_tensor)

    source_elem = source.type.tensor_type.elem_type
    batch = _batch_dim(source)
    new_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, None)
    new_input.type.tensor_type.shape.dim.append(copy.deepcopy(batch))
    for d in input_shape:
        new_input.type.tensor_type.shape.dim.add().dim_value = int(d)
    kept_inputs = [v for v in graph.input if v.name != source_name]
    del graph.input[:]
    graph.input.extend([new_input, *kept_inputs])

    builder = GraphBuilder(graph, default_opset(model), prefix=PREFIX)
    original_nodes = list(graph.node)
    del graph.node[:]
    transformed = _add_input_transform(builder, transform, tuple(input_shape), source_elem)
    graph.node.append(helper.make_node("Identity", [transformed], [source_name], name=builder.fresh("input_node")))
    graph.node.extend(original_nodes)

    del graph.output[:]

    def as_float(key: str, tensor: str) -> str:
        cast = elems[key] != TensorProto.FLOAT  # also when inference could not tell the type
        return builder.node("Cast", [tensor], f"{key}_float", to=TensorProto.FLOAT) if cast else tensor

    graph.node.append(helper.make_node("Flatten", [as_float("logits", logits_name)], ["logits"], axis=1, name=builder.fresh("logits_node")))
    graph.output.append(_matrix_value_info("logits", batch, None))
    probe = Network.probe("logits")
    graph.node.append(helper.make_node("Shape", [logits_name], [probe], name=builder.fresh("logits_shape_node")))
    graph.output.append(helper.make_tensor_value_info(probe, TensorProto.INT64, [None]))
    for layer, tensor in feature_tensors.items():
        value = as_float(layer, renamed.get(tensor, tensor))
        graph.node.append(helper.make_node("Identity", [value], [Network.raw(layer)], name=builder.fresh(f"{layer}_raw_node")))
        graph.output.append(helper.make_tensor_value_info(Network.raw(layer), TensorProto.FLOAT, None))
    return Network(model, source.name, logits_tensor, feature_tensors, notes, batch)
