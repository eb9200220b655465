"""Every OOD score of `ncguard.scores` as ONNX nodes, appended to any graph that has features and logits.

Torch-free (onnx.helper only), so it serves both `ncguard export` and bring-your-own-model
wrapping (issue #8). Each builder reads a fitted detector's `params()` (plus its hyperparameters)
and writes the same formula as the NumPy reference in `ncguard/scores/`, which stays the truth:
the parity checks in `export.parity` compare the two. Parameters become float32 initializers;
anything that depends only on them (factorisations, whitened means) is computed once here in
float64, so the graph does the least float32 arithmetic possible.

Nodes are emitted for the model's own default-domain opset (13 or newer): from opset 18 on the
reductions take their axes as an input instead of an attribute, and the builder follows suit.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ncguard.errors import ConfigError, ModelError
from ncguard.scores import COMBINED_SCORES, SCORES, Detector
from ncguard.scores.base import TINY_NORM

MIN_OPSET = 13  # Squeeze/Unsqueeze/ReduceSum with axes as inputs
AXES_AS_INPUT_OPSET = 18  # the other reductions followed in opset 18
NAME_PREFIX = "ncguard_score"


class GraphBuilder:
    """Adds uniquely named nodes and initializers to a graph, in the forms its opset expects."""

    def __init__(self, graph: onnx.GraphProto, opset: int, prefix: str = NAME_PREFIX):
        self.graph = graph
        self.opset = int(opset)
        self.prefix = prefix
        self._taken = _all_names(graph)
        self._axes: dict[tuple[int, ...], str] = {}

    def fresh(self, hint: str) -> str:
        name, index = f"{self.prefix}/{hint}", 1
        while name in self._taken:
            index += 1
            name = f"{self.prefix}/{hint}_{index}"
        self._taken.add(name)
        return name

    def constant(self, hint: str, value, dtype=np.float32) -> str:
        """A new initializer (float32 unless told otherwise) holding `value`."""
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, n_outputs: int = 1, **attributes):
        outputs = [self.fresh(hint or op.lower()) for _ in range(n_outputs)]
        self.graph.node.append(helper.make_node(op, inputs, outputs, name=self.fresh(f"{op}_node"), **attributes))
        return outputs[0] if n_outputs == 1 else outputs

    def axes(self, *axes: int) -> str:
        if axes not in self._axes:
            self._axes[axes] = self.constant("axes_" + "_".join(map(str, axes)), list(axes), np.int64)
        return self._axes[axes]

    def reduce(self, op: str, x: str, axis: int, keepdims: bool = False, hint: str | None = None) -> str:
        """Reduce* over one axis; axes go in as an input (ReduceSum from 13, all from 18) or an attribute."""
        if op == "ReduceSum" or self.opset >= AXES_AS_INPUT_OPSET:
            return self.node(op, [x, self.axes(axis)], hint, keepdims=int(keepdims))
        return self.node(op, [x], hint, axes=[axis], keepdims=int(keepdims))

    def squeeze(self, x: str, axis: int, hint: str | None = None) -> str:
        return self.node("Squeeze", [x, self.axes(axis)], hint)

    # Small compositions shared by several scores (each mirrors a helper in ncguard.scores.base).
    def l2_normalize(self, x: str) -> str:
        """Rows over max(norm, TINY_NORM), as `ncguard.scores.base.l2_normalize`."""
        norm = self.reduce("ReduceL2", x, 1, keepdims=True, hint="norm")
        return self.node("Div", [x, self.node("Max", [norm, self.constant("tiny_norm", TINY_NORM)])], "unit")

    def logsumexp(self, x: str) -> str:
        """Row-wise logsumexp shifted by the row maximum, as `ncguard.scores.base.logsumexp`."""
        top = self.reduce("ReduceMax", x, 1, keepdims=True, hint="row_max")
        total = self.reduce("ReduceSum", self.node("Exp", [self.node("Sub", [x, top])]), 1, hint="sum_exp")
        return self.node("Add", [self.squeeze(top, 1), self.node("Log", [total])], "logsumexp")

    def neg(self, x: str) -> str:
        return self.node("Neg", [x], "neg")


ScoreBuilder = Callable[[GraphBuilder, Detector, dict, "str | None", "str | None"], str]


def _etf(b: GraphBuilder, det, p, features, logits) -> str:
    cosines = b.node("MatMul", [b.l2_normalize(features), b.constant("unit_means_t", p["unit_means_"].T)], "cosines")
    return b.node("Sub", [b.constant("one", 1.0), b.reduce("ReduceMax", cosines, 1, hint="max_cosine")], "etf")


def _mahalanobis(b: GraphBuilder, det, p, features, logits) -> str:
    # min_c (v - mu_c)^T P (v - mu_c) = min_c ||v F - mu_c F||^2 with P = F F^T (P is PSD): one
    # [D, r] product per input instead of C [D, D] ones; F from the eigendecomposition of P.
    values, vectors = np.linalg.eigh(p["precision_"])
    keep = values > values.max(initial=0.0) * values.size * np.finfo(np.float64).eps
    factor = vectors[:, keep] * np.sqrt(values[keep])
    if factor.shape[1] == 0:  # a zero precision: every distance is 0, as in the reference
        factor = np.zeros((values.size, 1))
    projected = b.node("MatMul", [features, b.constant("precision_factor", factor)], "whitened")
    means = b.constant("whitened_means", (p["means_"] @ factor)[None])  # [1, C, r]
    diff = b.node("Sub", [b.node("Unsqueeze", [projected, b.axes(1)]), means], "diff")  # [N, C, r]
    distances = b.reduce("ReduceSumSquare", diff, 2, hint="distances")
    return b.reduce("ReduceMin", distances, 1, hint="mahalanobis")


def _energy(b: GraphBuilder, det, p, features, logits) -> str:
    temperature = float(det.temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"energy temperature must be a positive number, got {det.temperature!r}")
    scaled = b.node("Div", [logits, b.constant("temperature", temperature)], "scaled_logits")
    return b.node("Mul", [b.logsumexp(scaled), b.constant("minus_temperature", -temperature)], "energy")


def _msp(b: GraphBuilder, det, p, features, logits) -> str:
    top = b.reduce("ReduceMax", logits, 1, hint="max_logit")
    return b.neg(b.node("Exp", [b.node("Sub", [top, b.logsumexp(logits)])], "max_probability"))


def _maxlogit(b: GraphBuilder, det, p, features, logits) -> str:
    return b.neg(b.reduce("ReduceMax", logits, 1, hint="max_logit"))


def _knn(b: GraphBuilder, det, p, features, logits) -> str:
    k = int(p["k_"])
    similarity = b.node("MatMul", [b.l2_normalize(features), b.constant("bank_t", p["bank_"].T)], "similarity")
    top, _ = b.node("TopK", [similarity, b.constant("k", [k], np.int64)], "top_similarity", n_outputs=2, axis=1, largest=1)
    kth = b.node("Gather", [top, b.constant("kth_index", k - 1, np.int64)], "kth_similarity", axis=1)
    two = b.constant("two", 2.0)
    squared = b.node("Sub", [two, b.node("Mul", [kth, two])], "squared_distance")
    return b.node("Sqrt", [b.node("Max", [squared, b.constant("zero", 0.0)])], "knn")


def _ddu(b: GraphBuilder, det, p, features, logits) -> str:
    # -logsumexp_c(log w_c - ||L_c^-1 (v - mu_c)||^2 / 2) in 7 nodes. Centre first ([1, N, D] - [C, 1, D]
    # broadcasts straight to [C, N, D], no Transpose), then whiten per class with one batched MatMul
    # ([C, N, D] x [C, D, D]). Whitening v and mu_c separately and subtracting the two large results
    # cancels catastrophically in float32 when L_c^-1 has large entries (a collapsed layer). The 1/2 is
    # folded into the whitening (sqrt(1/2) L_c^-1), and ONNX Runtime's ReduceLogSumExp subtracts the row
    # maximum itself, as ncguard.scores.base.logsumexp does.
    whitening, means = p["whitening_"], p["means_"]
    diff = b.node("Sub", [b.node("Unsqueeze", [features, b.axes(0)]), b.constant("means", means[:, None, :])], "diff")
    half_whitening_t = np.sqrt(0.5) * np.transpose(whitening, (0, 2, 1))
    whitened = b.node("MatMul", [diff, b.constant("half_whitening_t", half_whitening_t)], "whitened")
    half_distances = b.reduce("ReduceSumSquare", whitened, 2, hint="half_distances")  # [C, N]
    log_joint = b.node("Sub", [b.constant("log_weights", p["log_weights_"][:, None]), half_distances], "log_joint")
    return b.neg(b.reduce("ReduceLogSumExp", log_joint, 0, hint="log_density"))


def _vim(b: GraphBuilder, det, p, features, logits) -> str:
    centred = b.node("Sub", [features, b.constant("origin", p["origin_"])], "centred")
    residual = b.reduce("ReduceL2", b.node("MatMul", [centred, b.constant("residual_basis", p["residual_basis_"])]), 1, hint="residual")
    virtual = b.node("Mul", [residual, b.constant("alpha", float(p["alpha_"]))], "virtual_logit")
    return b.node("Sub", [virtual, b.logsumexp(logits)], "vim")


def _nci(b: GraphBuilder, det, p, features, logits) -> str:
    predicted = b.node("ArgMax", [logits], "predicted", axis=1, keepdims=0)
    class_weight = b.node("Gather", [b.constant("weight", p["weight_"]), predicted], "predicted_weight", axis=0)
    centred = b.node("Sub", [features, b.constant("global_mean", p["global_mean_"])], "centred")
    norm = b.node("Max", [b.reduce("ReduceL2", centred, 1, hint="centred_norm"), b.constant("tiny_norm", TINY_NORM)])
    proximity = b.node("Div", [b.reduce("ReduceSum", b.node("Mul", [centred, class_weight]), 1), norm], "proximity")
    l1 = b.node("Mul", [b.reduce("ReduceL1", features, 1, hint="l1_norm"), b.constant("alpha", float(p["alpha_"]))])
    return b.neg(b.node("Add", [proximity, l1], "nci_id_score"))


def _neco(b: GraphBuilder, det, p, features, logits) -> str:
    standardised = b.node(
        "Div", [b.node("Sub", [features, b.constant("mean", p["mean_"])]), b.constant("scale", p["scale_"])], "standardised"
    )
    projected = b.node("MatMul", [standardised, b.constant("components_t", p["components_"].T)], "principal")
    norm = b.node("Max", [b.reduce("ReduceL2", standardised, 1), b.constant("tiny_norm", TINY_NORM)])
    ratio = b.node("Div", [b.reduce("ReduceL2", projected, 1), norm], "ratio")
    if det.use_max_logit:
        ratio = b.node("Mul", [ratio, b.reduce("ReduceMax", logits, 1, hint="max_logit")], "ratio_times_max_logit")
    return b.neg(ratio)


SCORE_GRAPHS: dict[str, ScoreBuilder] = {
    "etf": _etf,
    "mahalanobis": _mahalanobis,
    "energy": _energy,
    "msp": _msp,
    "maxlogit": _maxlogit,
    "knn": _knn,
    "ddu": _ddu,
    "vim": _vim,
    "nci": _nci,
    "neco": _neco,
}
assert set(SCORE_GRAPHS) == set(SCORES), "every score in ncguard.scores needs an ONNX builder here"


def _fused(b: GraphBuilder, det, p, features, logits) -> str:
    """ncguard.scores.fused.Fused: slice each layer out of the concatenated features, build each
    component with its own builder above, and combine the standardized (s - mu) / sigma.

    For "sum" the standardization is folded into constants, so it costs no node per component:
    sum_l (s_l - mu_l) / sigma_l = sum_l s_l / sigma_l - sum_l mu_l / sigma_l, and for a Mahalanobis
    component s_l / sigma_l is the Mahalanobis distance under the precision P / sigma_l.
    """
    slices = det.slices()
    layer_inputs = {
        layer: b.node(
            "Slice",
            [features, b.constant(f"{layer}_start", [start], np.int64), b.constant(f"{layer}_stop", [stop], np.int64), b.axes(1)],
            f"{layer}_features",
        )
        for layer, (start, stop) in slices.items()
    }
    parts = []
    for (layer, score), component, mu, sigma in zip(det.components_, det.detectors_, p["mu_"], p["sigma_"]):
        params, name = component.params(), f"{layer}_{score}"
        if det.combine == "sum" and score == "mahalanobis":
            params = dict(params, precision_=params["precision_"] / float(sigma))
        raw = SCORE_GRAPHS[score](b, component, params, layer_inputs.get(layer), logits)
        if det.combine == "max":
            centred = b.node("Sub", [raw, b.constant(f"{name}_mu", float(mu))], f"{name}_centred")
            parts.append(b.node("Div", [centred, b.constant(f"{name}_sigma", float(sigma))], f"{name}_z"))
        elif score == "mahalanobis":
            parts.append(raw)  # already s_l / sigma_l
        else:
            parts.append(b.node("Mul", [raw, b.constant(f"{name}_inverse_sigma", 1.0 / float(sigma))], f"{name}_scaled"))
    if det.combine == "max":
        return b.node("Max", parts, "fused")
    offset = -float(np.sum(np.asarray(p["mu_"], dtype=np.float64) / np.asarray(p["sigma_"], dtype=np.float64)))
    return b.node("Sum", [*parts, b.constant("fused_offset", [offset])], "fused")


# Scores that combine others (ncguard.scores.COMBINED_SCORES); they are not in SCORES (see there).
COMBINED_GRAPHS: dict[str, ScoreBuilder] = {"fused": _fused}
assert set(COMBINED_GRAPHS) == set(COMBINED_SCORES), "every combined score needs an ONNX builder here"


# ---------------------------------------------------------------------- appending to a graph


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    names |= {v.name for v in graph.value_info}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    names.discard("")
    return names


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
    """Flatten to [N, width] and cast to float32 when the tensor is another type (e.g. float16)."""
    elem = types[name].tensor_type.elem_type if name in types else TensorProto.FLOAT
    if elem not in (TensorProto.FLOAT, TensorProto.UNDEFINED):
        if elem not in (TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            raise ModelError(f"{what} tensor {name!r} has type {TensorProto.DataType.Name(elem)}, not a float type")
        name = b.node("Cast", [name], f"{what}_float", to=TensorProto.FLOAT)
    return b.node("Flatten", [name], f"{what}_matrix", axis=1)


def _batch_dim(model: onnx.ModelProto, *tensors: str, types: dict) -> onnx.TensorShapeProto.Dimension:
    for name in tensors:
        if name and name in types and types[name].tensor_type.HasField("shape") and types[name].tensor_type.shape.dim:
            return copy.deepcopy(types[name].tensor_type.shape.dim[0])
    dim = onnx.TensorShapeProto.Dimension()
    dim.dim_param = "N"
    return dim


def append_ood_head(
    model: onnx.ModelProto,
    detector: Detector,
    *,
    features: str | None = None,
    logits: str | None = None,
    output: str = "ood_score",
) -> onnx.ModelProto:
    """A copy of `model` with a graph output `output` (float32 [N]) holding `detector`'s score.

    `features` / `logits` name existing tensors of the graph (inputs, outputs or intermediates);
    the detector says which it reads. Features of any rank are flattened to [N, width], and
    float16/float64 tensors are cast to float32, so this works on graphs not written by ncguard.
    """
    builders = {**SCORE_GRAPHS, **COMBINED_GRAPHS}
    if detector.name not in builders:
        raise ConfigError(f"no ONNX graph for the score {detector.name!r}; known: {', '.join(sorted(builders))}")
    if detector.needs_fit and not getattr(detector, "fitted_", False):
        raise ConfigError(f"the {detector.name!r} detector must be fitted before it can be exported")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(
            f"the model uses opset {opset}; the OOD head needs opset {MIN_OPSET} or newer "
            "(convert it with onnx.version_converter.convert_version first)"
        )
    model = copy.deepcopy(model)
    graph = model.graph
    known = _all_names(graph)
    if output in {o.name for o in graph.output} or output in known:
        raise ModelError(f"the model already has a tensor named {output!r}; choose another output name")
    types = _tensor_types(model)
    builder = GraphBuilder(graph, opset)
    wanted = {"features": (detector.uses_features, features), "logits": (detector.uses_logits, logits)}
    inputs: dict[str, str | None] = {"features": None, "logits": None}
    for what, (needed, tensor) in wanted.items():
        if not needed:
            continue
        if not tensor:
            raise ConfigError(f"the {detector.name!r} score reads {what}: name the tensor that holds them")
        if tensor not in known:
            raise ModelError(f"the model has no tensor named {tensor!r} to read {what} from")
        inputs[what] = _as_float_matrix(builder, tensor, types, what)
    score = builders[detector.name](builder, detector, detector.params(), inputs["features"], inputs["logits"])
    graph.node.append(helper.make_node("Identity", [score], [output], name=builder.fresh("output")))
    value = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
    value.type.tensor_type.shape.dim.append(_batch_dim(model, features, logits, types=types))
    graph.output.append(value)
    return model
