"""A thin helper for writing ONNX nodes: what each detector's `build_graph` writes its formula with.

Torch-free (onnx.helper only; onnx is a core dependency). Each score's builder lives next to its
NumPy formula in `ncguard/scores/<score>.py`, so the two change together; the parity tests hold
them together. Parameters become float32 initializers; anything that depends only on them
(factorisations, whitened means) is computed once by the builder in float64, so the graph does the
least float32 arithmetic possible.

Nodes are emitted for the graph's own default-domain opset (13 or newer): from opset 18 on the
reductions take their axes as an input instead of an attribute, and the builder follows suit.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import TINY_NORM

MIN_OPSET = 13  # Squeeze/Unsqueeze/ReduceSum with axes as inputs
AXES_AS_INPUT_OPSET = 18  # the other reductions followed in opset 18
NAME_PREFIX = "ncguard_score"


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor, value and node name a graph already uses (new names must avoid them)."""
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    names |= {v.name for v in graph.value_info}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    names.discard("")
    return names


class GraphBuilder:
    """Adds uniquely named nodes and initializers to a graph, in the forms its opset expects."""

    def __init__(self, graph: onnx.GraphProto, opset: int, prefix: str = NAME_PREFIX):
        self.graph = graph
        self.opset = int(opset)
        self.prefix = prefix
        self._taken = all_names(graph)
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

    def scale(self, x: str, factor: float, hint: str = "scaled") -> str:
        """factor * x (x itself when factor is 1)."""
        return x if factor == 1.0 else self.node("Mul", [x, self.constant(f"{hint}_factor", float(factor))], hint)
