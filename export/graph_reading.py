"""Reading an existing ONNX classifier for `ncguard inspect` and `ncguard fit` (torch-free): names,
shapes, and which tensors could be its logits and features. Nothing here changes a graph; the
rewriting lives in export.graph_surgery.

Flattening rule (documented for users): a tensor read as logits or features must have the batch
axis first, and after it at most one axis longer than 1, e.g. [N, D], [N, D, 1, 1] (after global
pooling) or [N, 1, D]; it is flattened to [N, D]. A feature map is not flattened: that would give
thousands of correlated pixels-by-channels coordinates in which class means and covariances mean
little. Read as features, a feature map [N, C, H, W] or [N, C, L] is pooled to its per-channel mean
and standard deviation, [N, 2C] (`ncguard.pooling.channel_mean_std`, the statistics ncguard's own
models give the `fused` score for their convolutional blocks); logits must be [N, C].
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.score_graph import _tensor_types, default_opset
from ncguard.errors import ModelError

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
LINEAR_OPS = ("Gemm", "MatMul")


# ---------------------------------------------------------------------- loading and naming


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file (external weight files next to it are read in), or ModelError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data (FileNotFoundError), ...
        raise ModelError(f"{path} is not a readable ONNX model: {exc}") from None
    if not model.graph.node:
        raise ModelError(f"{path} is not a readable ONNX model: its graph has no nodes")
    return model


def subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def tensor_names(graph: onnx.GraphProto, recursive: bool = True) -> set[str]:
    """Every value name of the graph (and, by default, of its subgraphs)."""
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        if recursive:
            for sub in subgraphs(node):
                names |= tensor_names(sub)
    names.discard("")
    return names


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The inputs that take data (IR < 4 also lists the initializers as inputs)."""
    initializers = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in initializers]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output if output}


def resolve_tensor(model: onnx.ModelProto, name: str, flag: str) -> str:
    """The tensor `name` refers to: a tensor of the main graph, or a node (its first output).

    ModelError with the closest names when there is no such tensor or node.
    """
    graph = model.graph
    tensors = tensor_names(graph, recursive=False)
    if name in tensors:
        return name
    nodes = {node.name: node for node in graph.node if node.name}
    if name in nodes:
        return nodes[name].output[0]
    close = difflib.get_close_matches(name, sorted(tensors | set(nodes)), n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ModelError(
        f"{flag} {name!r}: the model has no tensor or node of that name{hint}. "
        "`ncguard inspect MODEL.onnx` lists the inputs, outputs and candidate feature tensors"
    )


# ---------------------------------------------------------------------- shapes


def shape_of(type_proto: onnx.TypeProto | None) -> list[int | str | None] | None:
    """[dims] with ints for fixed sizes, names for symbolic ones, None for unknown; None if no shape."""
    if type_proto is None or not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in type_proto.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


def format_shape(shape) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def elem_type_name(type_proto: onnx.TypeProto | None) -> str:
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return "?"
    elem = type_proto.tensor_type.elem_type
    return "?" if elem == TensorProto.UNDEFINED else helper.tensor_dtype_to_np_dtype(elem).name


def matrix_width(shape, *, rows: int | None = None) -> int | None:
    """Width D of a tensor read as [N, D] under the flattening rule (module docstring).

    `shape` may hold unknown (None) or symbolic dims; returns None when the width cannot be known
    yet. Raises ValueError (with the reason) when the rule is broken.
    """
    if shape is None:
        return None
    if len(shape) < 2:
        raise ValueError(f"it has {len(shape)} axis{'es' if len(shape) != 1 else ''}; [N, D] needs a batch axis and a feature axis")
    if rows is not None and isinstance(shape[0], int) and shape[0] != rows:
        raise ValueError(f"its first axis has {shape[0]} entries for a batch of {rows} inputs, so it is not the batch axis")
    rest = shape[1:]
    long_axes = [d for d in rest if not (isinstance(d, int) and d == 1)]
    if len(long_axes) > 1 and all(isinstance(d, int) for d in long_axes):
        raise ValueError("more than one axis after the batch axis is longer than 1 (a feature map?); choose a pooled or flattened tensor")
    if any(not isinstance(d, int) for d in rest):
        return None
    return int(np.prod(rest, dtype=np.int64)) if rest else 1


MAP_RANKS = (3, 4)  # [N, C, L] and [N, C, H, W]: the feature maps read through their channel statistics


def is_feature_map(shape, *, rows: int | None = None) -> bool:
    """Whether a tensor of this shape is a feature map that a features layer pools per channel: 3 or 4
    axes, the batch axis first (of `rows` entries when known), and more than one long axis after it."""
    if shape is None or len(shape) not in MAP_RANKS:
        return False
    if rows is not None and isinstance(shape[0], int) and shape[0] != rows:
        return False
    long_axes = [d for d in shape[1:] if not (isinstance(d, int) and d == 1)]
    return len(long_axes) > 1 and all(isinstance(d, int) for d in long_axes)


def layer_width(shape, *, rows: int | None = None) -> tuple[int | None, bool]:
    """(D, pooled) of a tensor read as a features layer: a feature map gives its per-channel mean and
    std, D = 2C (pooled True); anything else must be [N, D] under the flattening rule (ValueError
    saying why not). D is None when the shape does not tell it yet."""
    if is_feature_map(shape, rows=rows):
        return 2 * int(shape[1]), True
    try:
        return matrix_width(shape, rows=rows), False
    except ValueError as exc:
        raise ValueError(f"{exc}; feature maps are taken with {MAP_RANKS[0]} or {MAP_RANKS[1]} axes ([N, C, L], [N, C, H, W])") from None


def check_layer(tensor: str, shape, flag: str, rows: int | None = None) -> tuple[int | None, bool]:
    """`layer_width`, or ModelError naming the tensor and its shape."""
    try:
        return layer_width(shape, rows=rows)
    except ValueError as exc:
        raise ModelError(f"{flag} {tensor!r} has shape {format_shape(shape)}, which is neither [N, D] nor a feature map: {exc}") from None


def check_matrix(tensor: str, shape, flag: str, rows: int | None = None) -> int | None:
    """The tensor's width under the flattening rule, or ModelError naming the tensor and its shape."""
    try:
        return matrix_width(shape, rows=rows)
    except ValueError as exc:
        raise ModelError(f"{flag} {tensor!r} has shape {format_shape(shape)}, which is not [N, D]: {exc}") from None


# ---------------------------------------------------------------------- describing a model


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: list | None
    op: str  # the producing node's op type, "input" or "initializer"
    node: str = ""
    width: int | None = None  # D as a features layer (2C for a pooled feature map), when known
    usable: bool = False  # a float tensor fit can read as features (as far as its shape is known)
    pooled: bool = False  # a feature map, read through its per-channel mean and std

    def as_dict(self) -> dict:
        return {
            "name": self.name, "dtype": self.dtype, "shape": self.shape, "op": self.op, "node": self.node,
            "width": self.width, "usable": self.usable, "pooled": self.pooled,
        }


@dataclass
class ModelDescription:
    opset: int
    ir_version: int
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tensors: list[TensorInfo]  # every float intermediate tensor, in graph order
    suggested_logits: str | None = None
    suggested_features: str | None = None
    # several tensors for a multi-layer score: an early block, a late block, the penultimate layer
    suggested_feature_set: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.usable]


def _tensor_info(name: str, types: dict, op: str, node: str = "") -> TensorInfo:
    type_proto = types.get(name)
    shape = shape_of(type_proto)
    is_float = type_proto is not None and type_proto.tensor_type.elem_type in FLOAT_TYPES
    try:
        width, pooled = layer_width(shape)
        usable = is_float and shape is not None and (width is not None or len(shape) >= 2)
    except ValueError:
        width, usable, pooled = None, False, False
    return TensorInfo(name, elem_type_name(type_proto), shape, op, node, width, usable, pooled)


def logits_candidate(model: onnx.ModelProto, name: str | None = None) -> tuple[str, list[str]]:
    """(the tensor holding the logits, notes): `name` if given, else the model's one logits-like output.

    A tensor produced by Softmax/LogSoftmax is replaced by that node's input: the scores need
    logits, and the finished model recomputes the probabilities from them.
    """
    graph = model.graph
    notes = []
    if name:
        tensor = resolve_tensor(model, name, "--logits")
    else:
        types = _tensor_types(model)
        outputs = [o.name for o in graph.output]
        floats = [o for o in outputs if o in types and types[o].tensor_type.elem_type in FLOAT_TYPES]
        named = [o for o in floats if o.lower() == "logits"]
        matrices = []
        for o in floats:
            try:
                matrix_width(shape_of(types[o]))
                matrices.append(o)
            except ValueError:
                pass
        if named:
            tensor = named[0]
        elif len(matrices) == 1:
            tensor = matrices[0]
        elif not matrices:
            raise ModelError(
                f"the model has no logits-like output (a float [N, C] tensor); its outputs are {outputs}. "
                "Name the tensor that holds the class scores with --logits"
            )
        else:
            raise ModelError(f"several outputs could hold the logits ({', '.join(matrices)}): name one with --logits")
    producer = producers(graph).get(tensor)
    if producer is not None and producer.op_type in SOFTMAX_OPS:
        notes.append(f"{tensor!r} is the output of {producer.op_type}; its input {producer.input[0]!r} is used as the logits")
        tensor = producer.input[0]
    return tensor, notes


def penultimate_tensor(model: onnx.ModelProto, logits: str) -> str | None:
    """The tensor that feeds the final linear layer producing `logits` (Gemm, MatMul, MatMul + Add)."""
    graph = model.graph
    made_by = producers(graph)
    initializers = {t.name for t in graph.initializer}
    constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    fixed = initializers | constants
    node = made_by.get(logits)
    if node is not None and node.op_type == "Add":
        node = next((made_by[i] for i in node.input if i in made_by and made_by[i].op_type == "MatMul"), None)
    if node is None or node.op_type not in LINEAR_OPS:
        return None
    data_inputs = [i for i in node.input[:2] if i and i not in fixed]
    return data_inputs[0] if len(data_inputs) == 1 else None


def describe_model(model: onnx.ModelProto) -> ModelDescription:
    """Inputs, outputs and every float intermediate tensor (name, dtype, shape, op), for `ncguard inspect`."""
    graph = model.graph
    types = _tensor_types(model)
    made_by = producers(graph)
    inputs = [_tensor_info(v.name, types, "input") for v in graph_inputs(graph)]
    outputs = []
    for v in graph.output:
        node = made_by.get(v.name)
        outputs.append(_tensor_info(v.name, types, node.op_type if node else "input", node.name if node else ""))
    seen = {v.name for v in graph_inputs(graph)}
    tensors = []
    for node in graph.node:
        for name in node.output:
            if name and name not in seen and name in types and types[name].tensor_type.elem_type in FLOAT_TYPES:
                seen.add(name)
                tensors.append(_tensor_info(name, types, node.op_type, node.name))
    description = ModelDescription(
        opset=default_opset(model), ir_version=int(model.ir_version),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=inputs, outputs=outputs, tensors=tensors,
    )
    try:
        logits, notes = logits_candidate(model)
    except ModelError as exc:
        description.notes.append(str(exc))
        return description
    description.suggested_logits = logits
    description.notes += notes
    description.suggested_features = penultimate_tensor(model, logits)
    description.suggested_feature_set = suggested_feature_set(description)
    return description


# Ops whose output ends a convolutional block's step (activation, pooling): the block outputs worth
# reading. A bare Conv, BatchNorm or arithmetic output is an intermediate of a step: exporters
# decompose BatchNorm and adaptive pooling into Add/Mul/Div chains (torch's dynamo exporter writes
# a 7x7 -> 4x4 adaptive average as a run of Adds), and residual sums are followed by an activation.
BLOCK_OUTPUT_OPS = ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSwish", "HardSigmoid", "Gelu", "Tanh",
                    "Mish", "Elu", "Selu", "MaxPool", "AveragePool", "LpPool")


def suggested_feature_set(description: ModelDescription) -> list[str]:
    """[early block, late block, penultimate] for `--features A,B,C`, or [] without a penultimate tensor.

    The first and the last block output among the feature maps (activation or pooling outputs, in
    graph order; any feature map when no such op made one), pooled per channel, and the penultimate
    layer: the first block sees pixel statistics (noise, photos, contrast), the last one shapes, the
    penultimate layer the classes; `ncguard fit` scores every block it is given.

    Why an early block, when ncguard's own default (ncguard.scores.fused.default_components) reads
    the last block alone: the question differs. A foreign model's alternative is single-tensor knn,
    and on the 10-class plain check model (benchmarks/results/check/) this set beats it on all 9
    sets, while (last block, penultimate) loses digits' AUROC (0.991 against 0.993); on a near-OOD
    split it also beat knn on the unseen classes (AUROC 0.724 -> 0.820). On our dual-head models the
    early block's pixel statistics lost near OOD against the plain model's best score (issue 16).
    """
    if not description.suggested_features:
        return []
    maps = [t for t in description.tensors if t.usable and t.pooled]
    blocks = [t for t in maps if t.op in BLOCK_OUTPUT_OPS] or maps
    chosen = list(dict.fromkeys(t.name for t in (blocks[:1] + blocks[-1:])))
    return [*chosen, description.suggested_features] if chosen else []
