"""`ncguard inspect EXISTING.onnx`: what `ncguard fit` can read from a classifier you already have.

Lists the model's inputs and outputs, and the tensors that can serve as `--features`: float
tensors that are [N, D] under the flattening rule of export.graph_reading (batch axis first, at
most one longer axis after it, e.g. [N, 512] or [N, 512, 1, 1]). `--all` lists every float
tensor with its shape instead (feature maps included, marked unusable). The suggested `--logits`
is the model's logits-like output (the input of a final Softmax), and the suggested `--features`
the tensor feeding the final linear layer. Feature maps ([N, C, H, W], [N, C, L]) are candidates
too, read through their per-channel mean and std (width 2C): the suggested multi-layer set is an
early block, a late block and the penultimate layer (export.graph_reading.suggested_feature_set),
for `--features A,B,C` and the `fused` score. Shapes come from ONNX shape inference. Torch-free.
"""

from __future__ import annotations

import argparse
import json

from ..errors import ModelError


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_description(description, *, show_all: bool = False) -> str:
    from export.graph_reading import format_shape

    def mark(name: str) -> str:
        marks = []
        if name == description.suggested_logits:
            marks.append("suggested --logits")
        if name == description.suggested_features:
            marks.append("suggested --features")
        if name in description.suggested_feature_set:
            marks.append(f"suggested set #{description.suggested_feature_set.index(name) + 1}")
        return "<- " + ", ".join(marks) if marks else ""

    lines = [f"opset {description.opset}, IR version {description.ir_version}" + (f", made by {description.producer}" if description.producer else "")]
    lines.append("inputs:")
    lines.append(_table([[t.name, t.dtype, format_shape(t.shape)] for t in description.inputs]))
    lines.append("outputs:")
    lines.append(_table([[t.name, t.dtype, format_shape(t.shape), t.op, mark(t.name)] for t in description.outputs]))
    tensors = description.tensors if show_all else description.candidates
    title = ("float tensors (every one; 'no' = neither [N, D] after flattening nor a feature map)" if show_all else
             "candidate feature tensors ([N, D] after flattening, or a feature map pooled to its per-channel mean and std; "
             "--all lists every float tensor)")
    lines.append(f"{title}:")
    if tensors:
        rows = [["name", "shape", "width", "op", "node", *(["usable"] if show_all else []), ""]]
        for t in tensors:
            usable = ["yes" if t.usable else "no"] if show_all else []
            width = ("?" if t.width is None else str(t.width)) + (" (pooled)" if t.pooled else "")
            rows.append([t.name, format_shape(t.shape), width, t.op, t.node, *usable, mark(t.name)])
        lines.append(_table(rows))
    else:
        lines.append("  (none found by shape inference; `ncguard fit` still checks the tensor you name when it runs)")
    if description.suggested_feature_set:
        lines.append(f"suggested multi-layer set (early block, late block, penultimate; score fused): "
                     f"--features {','.join(description.suggested_feature_set)}")
    for note in description.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an ONNX classifier")
    p.add_argument("--all", action="store_true", help="list every float tensor, not only the [N, D] candidates")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from export.graph_reading import describe_model, load_onnx

    description = describe_model(load_onnx(args.model))
    if not description.inputs:
        raise ModelError(f"{args.model} declares no inputs")
    if getattr(args, "json", False):
        tensors = description.tensors if args.all else description.candidates
        print(json.dumps({
            "opset": description.opset,
            "ir_version": description.ir_version,
            "producer": description.producer,
            "inputs": [t.as_dict() for t in description.inputs],
            "outputs": [t.as_dict() for t in description.outputs],
            "candidates": [t.as_dict() for t in tensors],
            "suggested_logits": description.suggested_logits,
            "suggested_features": description.suggested_features,
            "suggested_feature_set": description.suggested_feature_set,
            "notes": description.notes,
        }, indent=2))
    else:
        print(f"{args.model}: {format_description(description, show_all=args.all)}")
    return 0
