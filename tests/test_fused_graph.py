"""The fused score's ONNX graph against its NumPy reference (torch-free, as test_export_score_graph)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.parity import compare_scores
from export.score_graph import append_ood_head
from ncguard.scores import Fused
from ncguard.stats import ClassStatistics
from tests.test_fused import N_CLASSES, _bundle, _layers


@pytest.fixture(scope="module")
def fitted_parts():
    train, labels = _layers(600, 0)
    held_out, _ = _layers(200, 1)
    stats = {layer: ClassStatistics(N_CLASSES, bank_size=256, seed=2).fit(x, labels) for layer, x in train.items()}
    weight = np.random.default_rng(4).normal(size=(N_CLASSES, 4))
    bias = np.array([0.1, -0.2, 0.3])
    rng = np.random.default_rng(5)
    test_id, _ = _layers(300, 6)
    test_ood = {layer: rng.normal(0, 6, (300, x.shape[1])) for layer, x in test_id.items()}
    return stats, weight, bias, held_out, test_id, test_ood


def scoring_graph(widths: dict[str, int], opset: int) -> onnx.ModelProto:
    """A graph whose inputs are each layer's features (named by the layer) and the logits, and no nodes yet."""
    inputs = [helper.make_tensor_value_info(layer, TensorProto.FLOAT, ["N", width]) for layer, width in widths.items()]
    inputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES]))
    graph = helper.make_graph([], "scores", inputs, [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


COMPONENT_SETS = [
    (("block1", "mahalanobis"), ("detection", "etf")),
    (("detection", "etf"), ("block1", "mahalanobis"), ("detection", "vim"), ("logits", "energy"), ("block1", "knn")),
]


DENSITIES = (("block1", "mahalanobis"), ("detection", "ddu-lowrank"))  # what the "joint" combine accepts

CASES = [(components, combine) for components in COMPONENT_SETS for combine in ("sum", "max")] + [(DENSITIES, "joint")]


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("components, combine", CASES, ids=["default-sum", "default-max", "five-sum", "five-max", "densities-joint"])
def test_fused_graph_matches_reference(fitted_parts, components, combine, opset):
    stats, weight, bias, held_out, test_id, test_ood = fitted_parts
    logits_of = lambda layers: layers["detection"] @ weight.T + bias  # noqa: E731
    fused = Fused(components=components, combine=combine).fit(_bundle(stats, weight, bias), {**held_out, "logits": logits_of(held_out)})
    widths = {layer: x.shape[1] for layer, x in test_id.items()}
    model = append_ood_head(scoring_graph(widths, opset), fused, {layer: layer for layer in fused.layers})
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for layers in (test_id, test_ood):
        feeds = {**{layer: x.astype(np.float32) for layer, x in layers.items()}, "logits": logits_of(layers).astype(np.float32)}
        graph_scores, graph_components = session.run(["ood_score", "ood_components"], feeds)
        assert graph_scores.dtype == np.float32 and graph_scores.shape == (len(feeds["logits"]),)
        reference = fused.score({layer: value.astype(np.float64) for layer, value in feeds.items()})
        width = sum(widths[layer] for layer in fused.layers if layer != "logits")
        result = compare_scores("fused", reference, graph_scores, width=width)
        assert result.worst_ratio < 0.1, result.describe()
        # the parts: weighted standardized components, in component_names order, that combine to the score
        parts = fused.component_scores({layer: value.astype(np.float64) for layer, value in feeds.items()})
        assert graph_components.shape == parts.shape == (len(feeds["logits"]), len(fused.component_names()))
        np.testing.assert_allclose(graph_components, parts, rtol=1e-3, atol=1e-3 * (1 + np.abs(parts).max()))
        combined = graph_components.max(axis=1) if combine == "max" else graph_components.sum(axis=1)
        np.testing.assert_allclose(combined, graph_scores, rtol=1e-5, atol=1e-4)
