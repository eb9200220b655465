"""The simplex ETF, the backbones and the dual-head model (DESIGN.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ncguard.errors import ConfigError, ModelError
from ncguard.pooling import pooling_matrix
from training.backbones import GridAvgPool2d, ModuleBackbone, build_backbone
from training.etf import simplex_classifier, simplex_etf
from training.model import DualHeadModel, build_model, normalization_stats


def simplex_gram(width: int, size: int) -> torch.Tensor:
    """c/(c-1) (I - 11^T/c) restricted to size x size: unit diagonal, -1/(c-1) off it."""
    return width / (width - 1) * (torch.eye(size, dtype=torch.float64) - 1.0 / width)


@pytest.mark.parametrize("width", [2, 3, 10, 64])
def test_square_etf_gram_matrix_is_the_simplex_form(width):
    etf = simplex_etf(width, width, dtype=torch.float64)
    torch.testing.assert_close(etf.T @ etf, simplex_gram(width, width))
    cosines = etf.T @ etf
    off_diagonal = cosines[~torch.eye(width, dtype=torch.bool)]
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, -1.0 / (width - 1)))
    torch.testing.assert_close(cosines.diagonal(), torch.ones(width, dtype=torch.float64))


@pytest.mark.parametrize("rows,cols", [(512, 128), (40, 10), (7, 3)])
def test_rectangular_etf_keeps_the_simplex_form_along_the_short_side(rows, cols):
    tall = simplex_etf(rows, cols, dtype=torch.float64)  # Linear(cols -> rows)
    torch.testing.assert_close(tall.T @ tall, simplex_gram(rows, cols))
    wide = simplex_etf(cols, rows, dtype=torch.float64)  # Linear(rows -> cols)
    torch.testing.assert_close(wide @ wide.T, simplex_gram(rows, cols))
    # The restriction is the top-left block of the square ETF of the larger width.
    torch.testing.assert_close(tall, simplex_etf(rows, rows, dtype=torch.float64)[:, :cols])


def test_simplex_classifier_rows_form_a_class_simplex():
    weight = simplex_classifier(10, 64, dtype=torch.float64)
    assert weight.shape == (10, 64)
    torch.testing.assert_close(weight @ weight.T, simplex_gram(10, 10))
    torch.testing.assert_close(weight.sum(dim=0), torch.zeros(64, dtype=torch.float64), atol=1e-12, rtol=0)


def test_etf_shapes_that_cannot_be_a_simplex_are_refused():
    with pytest.raises(ConfigError, match="width >= 2"):
        simplex_etf(1, 1)
    with pytest.raises(ConfigError, match="feature dim >= classes"):
        simplex_classifier(10, 5)


def test_projector_holds_frozen_etf_weights():
    model = build_model("cnn", (1, 8, 8), 10)
    expand, _, reduce = model.projector
    dim = model.feature_dim
    torch.testing.assert_close(expand.weight, simplex_etf(4 * dim, dim))
    torch.testing.assert_close(reduce.weight, simplex_etf(dim, 4 * dim))
    assert not expand.weight.requires_grad and not reduce.weight.requires_grad
    assert expand.bias is None and reduce.bias is None
    frozen = {id(p) for p in model.frozen_parameters()}
    assert frozen == {id(expand.weight), id(reduce.weight)}


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 9, 13)])
def test_cnn_works_for_any_image_size_from_8(shape):
    backbone = build_backbone("cnn", shape).eval()
    features = backbone.forward_features(torch.rand(3, *shape))
    assert list(features)[-1] == "features"
    assert features["features"].shape == (3, backbone.feature_dim)
    assert features["block1"].ndim == 4


def test_cnn_linear_leaves_h_signed_and_is_otherwise_the_cnn():
    torch.manual_seed(0)
    linear = build_backbone("cnn-linear", (1, 28, 28)).eval()
    torch.manual_seed(0)
    rectified = build_backbone("cnn", (1, 28, 28)).eval()
    x = torch.rand(16, 1, 28, 28)
    with torch.inference_mode():
        h_linear, h_rectified = linear(x), rectified(x)
    assert (h_linear < 0).any() and not (h_rectified < 0).any()
    torch.testing.assert_close(torch.relu(h_linear), h_rectified)


def test_resnet18_is_cifar_style_and_takes_small_images():
    backbone = build_backbone("resnet18", (3, 8, 8)).eval()
    assert backbone.stem[0].kernel_size == (3, 3) and backbone.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())
    with torch.inference_mode():
        assert backbone(torch.rand(2, 3, 8, 8)).shape == (2, 512)


def test_mlp_takes_vectors():
    backbone = build_backbone("mlp", (20,)).eval()
    assert backbone(torch.rand(4, 20)).shape == (4, backbone.feature_dim)


@pytest.mark.parametrize(
    "arch,shape,message",
    [("cnn", (20,), "use --arch mlp"), ("cnn", (1, 7, 7), "at least 8x8"), ("vgg", (1, 8, 8), "unknown architecture")],
)
def test_backbone_refuses_inputs_it_cannot_take(arch, shape, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(arch, shape)


def test_module_backbone_adapts_any_module_and_checks_its_output():
    module = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    model = DualHeadModel(ModuleBackbone(module, 6), n_classes=3, input_shape=(12,)).eval()
    output = model(torch.rand(5, 12))
    assert output.logits.shape == (5, 3) and output.transfer.shape == (5, 6)
    wrong = DualHeadModel(ModuleBackbone(module, 7), n_classes=3, input_shape=(12,))
    with pytest.raises(ModelError, match=r"flat features \[N, 7\]"):
        wrong(torch.rand(5, 12))


@pytest.mark.parametrize("head", ["etf", "plain", "l2"])
def test_heads_give_the_documented_detection_features(head):
    torch.manual_seed(0)
    model = build_model("mlp", (10,), 4, head=head).eval()
    logits, h, z = model(torch.randn(6, 10))
    if head == "plain":
        torch.testing.assert_close(z, h)
    else:
        torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    weight, bias = model.classifier_weight_bias()
    torch.testing.assert_close(logits.double(), z.double() @ torch.from_numpy(weight).T + torch.from_numpy(bias))


def test_fixed_simplex_classifier_is_a_buffer_not_a_parameter():
    model = build_model("mlp", (10,), 4, classifier="simplex")
    assert "simplex_weight" in dict(model.named_buffers())
    assert all("simplex" not in name for name, _ in model.named_parameters())
    weight, bias = model.classifier_weight_bias()
    np.testing.assert_array_equal(bias, 0.0)
    assert weight.shape == (4, model.feature_dim)


def test_input_normalization_is_a_buffer_in_the_state_dict():
    rng = np.random.default_rng(0)
    x = (rng.random((50, 3, 8, 8)) * np.array([1.0, 0.5, 0.2])[None, :, None, None]).astype(np.float32)
    mean, std = normalization_stats(x)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-4)
    model = build_model("cnn", (3, 8, 8), 2, input_mean=mean, input_std=std)
    state = model.state_dict()
    np.testing.assert_allclose(state["input_mean"].flatten().numpy(), mean)
    normalized = model.normalize_input(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(normalized.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)


@pytest.mark.parametrize("grid", [0, 2])
def test_layer_features_pool_feature_maps_per_channel(grid):
    model = build_model("cnn", (1, 8, 8), 3, block_grid=grid).eval()
    with torch.inference_mode():
        layers = model.layer_features(torch.rand(4, 1, 8, 8))
    assert list(layers) == ["block1", "block2", "block3", "transfer", "detection", "logits"]
    block1_channels = model.backbone.block1[0][0].out_channels
    assert layers["block1"].shape == (4, (grid * grid + 2) * block1_channels)  # grid means, mean and std per channel
    assert all(value.ndim == 2 for value in layers.values())


@pytest.mark.parametrize("size, grid", [((7, 7), 4), ((28, 28), 4), ((5, 9), 3), ((2, 2), 4), ((8, 6), (4, 3))])
def test_grid_pooling_matrices_reproduce_adaptive_average_pooling(size, grid):
    x = torch.rand(3, 5, *size, dtype=torch.float64)
    out_h, out_w = (grid, grid) if isinstance(grid, int) else grid
    by_matrices = torch.from_numpy(pooling_matrix(size[0], out_h)) @ x @ torch.from_numpy(pooling_matrix(size[1], out_w)).T
    torch.testing.assert_close(by_matrices, torch.nn.functional.adaptive_avg_pool2d(x, grid))


def test_grid_pooling_exports_as_matrix_products_not_gathers():
    """Under torch.export (what the ONNX exporter traces) the cnn's pooling is two MatMuls with the same values."""
    pool = GridAvgPool2d(4).eval()
    x = torch.rand(2, 8, 7, 7)
    program = torch.export.export(pool, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("adaptive" in op for op in ops), ops
    assert any("matmul" in op or "mm" in op for op in ops), ops
    torch.testing.assert_close(program.module()(x), torch.nn.functional.adaptive_avg_pool2d(x, 4))
    assert build_backbone("cnn", (1, 28, 28)).head[0].__class__ is GridAvgPool2d
