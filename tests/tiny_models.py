"""Small, real ncguard models built by hand with onnx.helper, for tests that need a model file
before (or without) training one: a linear classifier on the flattened input, scored by max logit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ncguard.model_file import DriftReference, ModelMetadata, save_model, stamp


def tiny_graph(weight: np.ndarray, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """input [N, *input_shape] -> features = flatten(input); logits = features W^T; ood_score = -max logit."""
    n_classes, width = weight.shape
    nodes = [
        helper.make_node("Flatten", ["input"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "weight_t"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ReduceMax", ["logits", "class_axis"], ["max_logit"], keepdims=0),
        helper.make_node("Neg", ["max_logit"], ["ood_score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes]),
            helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width]),
        ],
        [
            numpy_helper.from_array(weight.T.astype(np.float32), "weight_t"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "class_axis"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def tiny_metadata(classes: list[str], input_shape: tuple[int, ...], width: int, **overrides) -> ModelMetadata:
    values = dict(
        name="tiny",
        classes=list(classes),
        input_shape=list(input_shape),
        input_scale=1.0,
        score="maxlogit",
        threshold=-0.5,
        tpr=0.95,
        drift_reference=DriftReference(
            score_quantiles=list(np.linspace(-2.0, 0.0, 11)),
            class_priors=[1.0 / len(classes)] * len(classes),
            feature_mean=[0.0] * width,
            feature_std=[1.0] * width,
        ),
        statistics_checksum="0" * 64,
    )
    values.update(overrides)
    return ModelMetadata(**values)


def write_tiny_model(path: str | Path, input_shape: tuple[int, ...] = (1, 8, 8), n_classes: int = 3, seed: int = 0, **overrides) -> Path:
    """A stamped, checksummed ncguard model file with random weights."""
    width = int(np.prod(input_shape))
    weight = np.random.default_rng(seed).normal(size=(n_classes, width))
    model = stamp(tiny_graph(weight, input_shape), tiny_metadata([f"class{i}" for i in range(n_classes)], input_shape, width, **overrides))
    return save_model(model, path)
