"""The per-channel statistics of feature maps: one formula (ncguard.pooling) run by NumPy (ncguard fit's
reference), by torch (training's layer_features) and written as ONNX nodes (ncguard fit's graph);
the three must agree, and agree with a plain two-pass mean and standard deviation; the grid means of
ncguard's own models agree with adaptive average pooling."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from ncguard.errors import ConfigError
from ncguard.pooling import block_statistics, channel_mean_std, channel_mean_std_graph, grid_pooling_matrix
from ncguard.scores.graph import GraphBuilder


def pooling_graph(rank: int, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([], "pool", [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", "C", *["S"] * (rank - 2)])], [])
    builder = GraphBuilder(graph, opset)
    out = channel_mean_std_graph(builder, "maps")
    graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", None]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("shape", [(5, 3, 6, 7), (4, 8, 11)])
@pytest.mark.parametrize("opset", [13, 18])
def test_numpy_and_onnx_forms_agree_with_a_two_pass_mean_and_std(shape, opset):
    maps = np.random.default_rng(0).gamma(2.0, size=shape).astype(np.float32)  # post-ReLU-like, order 1
    flat = maps.astype(np.float64).reshape(shape[0], shape[1], -1)
    expected = np.concatenate([flat.mean(axis=2), flat.std(axis=2)], axis=1)

    numpy_form = channel_mean_std(maps)
    assert numpy_form.shape == (shape[0], 2 * shape[1]) and numpy_form.dtype == np.float32
    np.testing.assert_allclose(numpy_form, expected, rtol=1e-5, atol=1e-5)

    session = onnxruntime.InferenceSession(pooling_graph(len(shape), opset).SerializeToString(), providers=["CPUExecutionProvider"])
    (graph_form,) = session.run(None, {"maps": maps})
    np.testing.assert_allclose(graph_form, numpy_form, rtol=1e-5, atol=1e-6)


def test_a_constant_channel_has_zero_std_not_nan():
    """E[x^2] - E[x]^2 can round below zero; it is clipped before the square root."""
    maps = np.full((2, 3, 5, 5), 0.1, dtype=np.float32)
    pooled = channel_mean_std(maps)
    assert np.all(np.isfinite(pooled)) and np.all(pooled[:, 3:] >= 0)
    session = onnxruntime.InferenceSession(pooling_graph(4, 18).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.all(np.isfinite(session.run(None, {"maps": maps})[0]))


def test_training_pools_blocks_with_the_same_formula():
    torch = pytest.importorskip("torch")
    from training.model import block_statistics as torch_form

    maps = np.random.default_rng(1).gamma(2.0, size=(3, 4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(torch_form(torch.from_numpy(maps), 0).numpy(), channel_mean_std(maps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 7, 7), (2, 5, 2, 3), (2, 3, 9)])
def test_block_statistics_are_grid_means_then_whole_map_mean_and_std(shape):
    """Grid means equal adaptive average pooling (torch's windows), channel-major, then channel_mean_std;
    the NumPy and torch forms agree (training's layer_features runs the torch one)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from training.model import block_statistics as torch_form

    maps = np.random.default_rng(2).gamma(2.0, size=shape).astype(np.float32)
    pool = F.adaptive_avg_pool2d if len(shape) == 4 else F.adaptive_avg_pool1d
    cells = pool(torch.from_numpy(maps).double(), 2).reshape(shape[0], -1).numpy()
    expected = np.concatenate([cells, channel_mean_std(maps)], axis=1)

    numpy_form = block_statistics(maps, 2)
    assert numpy_form.shape == (shape[0], shape[1] * 2 ** (len(shape) - 2) + 2 * shape[1]) and numpy_form.dtype == np.float32
    np.testing.assert_allclose(numpy_form, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(torch_form(torch.from_numpy(maps), 2).numpy(), numpy_form, rtol=1e-6, atol=1e-6)


def test_block_grid_zero_is_the_whole_map_statistics_and_bad_grids_are_refused():
    maps = np.random.default_rng(3).gamma(2.0, size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(block_statistics(maps, 0), channel_mean_std(maps))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="block grid"):
            block_statistics(maps, bad)


def test_grid_pooling_matrix_rows_average_and_cells_are_row_major():
    kernel = grid_pooling_matrix((4, 6), (2, 3))
    assert kernel.shape == (24, 6)
    np.testing.assert_allclose(kernel.sum(axis=0), 1.0)
    image = np.arange(24, dtype=np.float64).reshape(4, 6)
    np.testing.assert_allclose(image.reshape(-1) @ kernel, image.reshape(2, 2, 3, 2).mean(axis=(1, 3)).reshape(-1))
