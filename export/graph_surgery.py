"""Reading and reshaping an existing ONNX classifier for `ncguard fit` and `ncguard inspect` (torch-free).

What a foreign graph needs before ncguard can finish it (export.finish): one input named `input`
taking the readers' float32 [N, *shape] data (with the model's own scaling and dtype applied in
the graph), and two outputs, `logits` [N, C] and `features` [N, D], taken from tensors the user
names (a graph output, an intermediate tensor, or a node, meaning its first output). Everything
is done with the onnx library: shape inference for shapes, helper nodes for the new edges.

Flattening rule (documented for users): a tensor read as logits or features must have the batch
axis first, and after it at most one axis longer than 1, e.g. [N, D], [N, D, 1, 1] (after global
pooling) or [N, 1, D]; it is flattened to [N, D]. A feature map such as [N, 64, 7, 7] is refused:
flattening it would give thousands of correlated pixels-by-channels coordinates in which class
means and covariances mean little; pick the pooled tensor after it instead.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.score_graph import MIN_OPSET, GraphBuilder, _tensor_types, default_opset
from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.model_file import INPUT_NAME, OUTPUT_NAMES

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
LINEAR_OPS = ("Gemm", "MatMul")
PREFIX = "ncguard_byom"
PROBE_SUFFIX = "_shape"  # extra outputs holding the raw shapes of the logits and features tensors


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


def _subgraphs(node: onnx.NodeProto):
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
            for sub in _subgraphs(node):
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


# ---------------------------------------------------------------------- describing a model


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: list | None
    op: str  # the producing node's op type, "input" or "initializer"
    node: str = ""
    width: int | None = None  # D under the flattening rule, when known
    usable: bool = False  # a float tensor that passes the flattening rule (as far as its shape is known)

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape, "op": self.op, "node": self.node, "width": self.width, "usable": self.usable}


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
    notes: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.usable]


def _tensor_info(name: str, types: dict, op: str, node: str = "") -> TensorInfo:
    type_proto = types.get(name)
    shape = shape_of(type_proto)
    is_float = type_proto is not None and type_proto.tensor_type.elem_type in FLOAT_TYPES
    try:
        width = matrix_width(shape)
        usable = is_float and shape is not None and (width is not None or len(shape) >= 2)
    except ValueError:
        width, usable = None, False
    return TensorInfo(name, elem_type_name(type_proto), shape, op, node, width, usable)


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
    return description


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
        for sub in _subgraphs(node):
            _rename(sub, old, new)


def _outer_references(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read (some from the enclosing graph)."""
    names: set[str] = set()
    for sub in _subgraphs(node):
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
    """The reshaped graph: input `input`, outputs `logits` and `features` (plus their raw-shape probes)."""

    model: onnx.ModelProto
    source_input: str
    logits_tensor: str  # names in the original model
    features_tensor: str
    notes: list[str] = field(default_factory=list)
    batch_dim: onnx.TensorShapeProto.Dimension | None = None

    @staticmethod
    def probe(name: str) -> str:
        return f"{PREFIX}/{name}{PROBE_SUFFIX}"

    def finished(self, n_classes: int, width: int) -> onnx.ModelProto:
        """A copy without the shape probes, with the outputs' widths declared and dead nodes pruned."""
        model = copy.deepcopy(self.model)
        graph = model.graph
        outputs = [_matrix_value_info("logits", self.batch_dim, n_classes), _matrix_value_info("features", self.batch_dim, width)]
        del graph.output[:]
        graph.output.extend(outputs)
        prune(graph)
        return model


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
    features: str,
    logits: str | None,
    input_shape: tuple[int, ...],
    transform: InputTransform,
    data_name: str = "data",
) -> Network:
    """The model reshaped to the contract's input and the two outputs the finishing steps need.

    The original input becomes an internal tensor fed from `input` through `transform`; names
    that collide with the contract's (`input`, `logits`, ...) are renamed first, so a model that
    already uses them keeps working. The raw shapes of the two tensors are extra outputs (probes)
    so the first batch can check them against the flattening rule even where shape inference
    could not tell.
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
    features_tensor = resolve_tensor(model, features, "--features")
    logits_tensor, logit_notes = logits_candidate(model, logits)
    notes += logit_notes
    types = _tensor_types(model)
    elems = {}
    for contract_name, flag, tensor in (("features", "--features", features_tensor), ("logits", "--logits", logits_tensor)):
        check_matrix(tensor, shape_of(types.get(tensor)), flag)
        elems[contract_name] = types[tensor].tensor_type.elem_type if tensor in types else TensorProto.UNDEFINED
        if elems[contract_name] not in (*FLOAT_TYPES, TensorProto.UNDEFINED):
            raise ModelError(f"{flag} {tensor!r} holds {elem_type_name(types[tensor])} values, not floats")

    taken = tensor_names(graph)
    renamed = {}
    for name in (INPUT_NAME, *OUTPUT_NAMES):
        if name in taken:
            new = f"{PREFIX}/original/{name}"
            _rename(graph, name, new)
            renamed[name] = new
    source_name = renamed.get(source.name, source.name)
    features_name = renamed.get(features_tensor, features_tensor)
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
    for contract_name, tensor in (("logits", logits_name), ("features", features_name)):
        cast = elems[contract_name] != TensorProto.FLOAT  # also when inference could not tell the type
        value = builder.node("Cast", [tensor], f"{contract_name}_float", to=TensorProto.FLOAT) if cast else tensor
        graph.node.append(helper.make_node("Flatten", [value], [contract_name], axis=1, name=builder.fresh(f"{contract_name}_node")))
        graph.output.append(_matrix_value_info(contract_name, batch, None))
        probe = Network.probe(contract_name)
        graph.node.append(helper.make_node("Shape", [tensor], [probe], name=builder.fresh(f"{contract_name}_shape_node")))
        graph.output.append(helper.make_tensor_value_info(probe, TensorProto.INT64, [None]))
    return Network(model, source.name, logits_tensor, features_tensor, notes, batch)


def check_matrix(tensor: str, shape, flag: str, rows: int | None = None) -> int | None:
    """The tensor's width under the flattening rule, or ModelError naming the tensor and its shape."""
    try:
        return matrix_width(shape, rows=rows)
    except ValueError as exc:
        raise ModelError(f"{flag} {tensor!r} has shape {format_shape(shape)}, which is not [N, D]: {exc}") from None
