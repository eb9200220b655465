"""The serving benchmark's OOD-cost attribution: which of the nodes ONNX Runtime runs belong to the OOD score."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks.serving.local_paths import _ood_only_nodes, ood_node_share, ood_wall_cost


def _graph() -> onnx.GraphProto:
    """x -> shared -> logits / probabilities / features, and shared -> score_a -> ood_score."""
    nodes = [
        helper.make_node("Relu", ["x"], ["shared"], name="shared"),
        helper.make_node("Identity", ["shared"], ["logits"], name="logits_node"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax"),
        helper.make_node("Identity", ["shared"], ["features"], name="features_node"),
        helper.make_node("Neg", ["shared"], ["score_a"], name="score_a"),
        helper.make_node("Abs", ["score_a"], ["ood_score"], name="score_b"),
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3])  # noqa: E731
    return helper.make_graph(nodes, "g", [value("x")], [value(n) for n in ("logits", "probabilities", "ood_score", "features")])


def test_only_nodes_that_nothing_but_the_score_needs_are_the_ood_part():
    assert _ood_only_nodes(_graph()) == {"score_a", "score_b"}


def test_the_scores_nodes_of_the_graph_onnx_runtime_runs_are_attributed(digits_model_path):
    share = ood_node_share(digits_model_path, [4], calls=3)["4"]
    names = set(share["ood_nodes"])
    assert any(name.startswith("ncguard_score/") for name in names)
    network_like = [n for n in names if not n.startswith("ncguard_score/") and ("conv" in n.lower() or "gemm" in n.lower())]
    assert not network_like, names  # the network's convolutions and linear layers are not the OOD part
    assert 0.0 < share["ood_share"] < 1.0
    assert share["ood_us"] > 0 and share["rest_us"] > 0
    assert abs(share["ood_us"] / share["rest_us"] - share["ood_adds"]) < 0.01


def test_the_wall_clock_cost_pairs_the_graph_with_and_without_the_score(digits_model_path):
    costs = ood_wall_cost(digits_model_path, [1, 4], calls=20, budget_s=5.0)
    assert set(costs) == {1, 4}
    assert all(np.isfinite(cost) and cost > -1.0 for cost in costs.values())


def test_graph_ab_reports_every_model_profiled_alternately(digits_model_path, tmp_path):
    from benchmarks.graph_ab import main

    assert main(["--model", f"one={digits_model_path}", "--model", f"two={digits_model_path}", "--rounds", "2", "--calls", "3",
                 "--out", str(tmp_path)]) == 0
    report = (tmp_path / "graph_ab.md").read_text()
    assert "| one |" in report and "| two |" in report
    payload = json.loads((tmp_path / "graph_ab.json").read_text())
    assert len(payload["models"]["one"]["1"]["rounds"]) == 2


def test_graph_ab_names_a_bad_model_argument(tmp_path, capsys):
    from benchmarks.graph_ab import main

    with pytest.raises(SystemExit):
        main(["--model", "no-label.onnx", "--out", str(tmp_path)])
    assert "LABEL=FILE.onnx" in capsys.readouterr().err
