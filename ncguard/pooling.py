"""Per-channel statistics of a feature map: the one formula every multi-layer score reads blocks with.

A convolutional block's output [N, C, H, W] (or a 1-D one, [N, C, L]) is too wide and too
correlated for class means and covariances; its per-channel mean and standard deviation ([N, 2C])
are cheap low-level statistics that catch inputs whose pixels look unlike the training data (the
`fused` score's early-block component, ncguard.scores.fused). Models trained by ncguard with
`--block-grid N` also keep each channel's means on a coarse grid (`block_statistics`), because
whole-map statistics cannot see where things are.

The formula exists once, here, in three forms that must agree:
- `channel_mean_std(maps, xp)`: written against the array namespace `xp`, so NumPy (`ncguard fit`'s
  reference for a foreign model) and torch (`training.model.DualHeadModel.layer_features`, which
  the torch exporter turns into ONNX) run the very same lines;
- `channel_mean_std_graph(builder, maps)`: the same arithmetic as ONNX nodes, for graphs ncguard
  did not trace from torch (`ncguard fit` pools a foreign model's feature maps in-graph); the parity
  check of export.finish holds it to the NumPy form.

Torch-free: torch is only ever passed in as `xp` by training/.
"""

from __future__ import annotations

import numpy as np

# Cells per side of the grid on which `ncguard train --block-grid N` also averages each block
# channel; the default, 0, pools whole maps. What a grid of 2 does (issue 16; benchmarks/results/near/
# grid_study.md and the README beside it): a rotated garment keeps its texture, edges and
# intensity histogram, so whole-map [mean, std] barely move, and a 2x2 grid tells top from bottom and
# left from right. With it, the ID-only proxy models (benchmarks/quality/select.py) score block3 +
# low-rank DDU 0.677 against 0.667, every near-OOD split improves on both metrics and so does
# rotation. But its 512 grid means dilute the whole-map statistics that catch blur and noise: on a
# fresh 10-class model the default with the grid loses shift-blur to the plain model's oracle and beats
# it on 7 of 9 far sets, against 8 of 9 without. Far OOD is the detector's strength and not to be
# traded, so the grid is opt-in. It also needs many training images: on scikit-learn's digits (about
# 1,400 fit images; block3 has 768 features with the grid) the tied covariance is singular, and
# `fused` flagged 40% of uniform noise instead of nearly all of it.
DEFAULT_BLOCK_GRID = 0
# Runs and checkpoints written before the grid existed pooled whole maps only.
UNRECORDED_BLOCK_GRID = 0


def pooling_matrix(size: int, out_size: int) -> np.ndarray:
    """[out_size, size] averaging weights of adaptive average pooling along one axis.

    Row i averages inputs floor(i * size / out) .. ceil((i + 1) * size / out) - 1, exactly the
    windows torch's adaptive_avg_pool2d uses.
    """
    weights = np.zeros((out_size, size))
    for i in range(out_size):
        start, end = (i * size) // out_size, -((-(i + 1) * size) // out_size)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def grid_pooling_matrix(spatial: tuple[int, ...], grid) -> np.ndarray:
    """[prod(spatial), prod(cells)]: a flattened map times this is the map adaptively averaged to
    `grid` cells per spatial axis (an int for every axis, or one per axis), cells in row-major
    order: the kron of `pooling_matrix` per axis."""
    cells = (grid,) * len(spatial) if isinstance(grid, (int, np.integer)) else tuple(grid)
    kernel = np.ones((1, 1))
    for size, out in zip(spatial, cells, strict=True):
        kernel = np.kron(kernel, pooling_matrix(int(size), int(out)))
    return kernel.T


def check_block_grid(grid) -> int:
    """`grid` as a whole number >= 0, or ConfigError naming the problem."""
    from .errors import ConfigError

    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 0:
        raise ConfigError(f"the block grid must be a whole number >= 0 (cells per side; 0 pools whole maps), got {grid!r}")
    return int(grid)


def block_statistics(maps, grid: int, xp=np):
    """[N, C, *spatial] -> [N, C * grid^k + 2C] (k spatial axes): each channel's means on a `grid` x
    `grid` grid (channel-major, cells row-major), then `channel_mean_std`. `grid` 0 is
    `channel_mean_std` alone. The grid means are one product with the constant `grid_pooling_matrix`,
    which is also what the ONNX exporter writes (one MatMul, as training.backbones.GridAvgPool2d).
    `xp`: numpy or torch, as in `channel_mean_std`.
    """
    whole = channel_mean_std(maps, xp)
    if not check_block_grid(grid):
        return whole
    flat = maps.reshape(maps.shape[0], maps.shape[1], -1)
    kernel = grid_pooling_matrix(tuple(maps.shape[2:]), grid)
    kernel = flat.new_tensor(kernel) if hasattr(flat, "new_tensor") else kernel.astype(flat.dtype)
    cells = (flat @ kernel).reshape(maps.shape[0], -1)
    return xp.concatenate([cells, whole], 1)


def channel_mean_std(maps, xp=np):
    """[N, C, *spatial] -> [N, 2C]: per-channel mean, then per-channel (population) standard deviation.

    One pass over [N, C, H*W], var = E[x^2] - E[x]^2 (clipped at 0 against round-off): in ONNX
    Runtime this was the cheapest form measured (about half the cost of the centred two-pass form
    at batch 64; reducing the 4-d maps over (2, 3) directly was up to 2x slower with two threads),
    and these statistics are most of what the multi-layer score costs in the served graph. Block
    outputs are post-ReLU values of order 1, so float32 loses nothing that matters here. `xp` is
    the array namespace (numpy or torch): only operations both spell the same way are used.
    """
    flat = maps.reshape(maps.shape[0], maps.shape[1], -1)
    mean = flat.mean(2)
    variance = (flat * flat).mean(2) - mean * mean
    return xp.concatenate([mean, xp.sqrt(variance.clip(min=0.0))], 1)


def channel_mean_std_graph(builder, maps: str, hint: str = "pooled") -> str:
    """`channel_mean_std` as ONNX nodes on `builder` (ncguard.scores.graph.GraphBuilder): float32
    [N, C, *spatial] tensor `maps` -> the name of its [N, 2C] statistics."""
    flat = builder.node("Reshape", [maps, builder.constant(f"{hint}_shape", [0, 0, -1], np.int64)], f"{hint}_flat")
    mean = builder.reduce("ReduceMean", flat, 2, hint=f"{hint}_mean")
    squares = builder.reduce("ReduceMean", builder.node("Mul", [flat, flat], f"{hint}_squared"), 2, hint=f"{hint}_mean_square")
    variance = builder.node("Sub", [squares, builder.node("Mul", [mean, mean], f"{hint}_mean_squared")], f"{hint}_variance")
    std = builder.node("Sqrt", [builder.node("Relu", [variance], f"{hint}_variance_clipped")], f"{hint}_std")
    return builder.node("Concat", [mean, std], hint, axis=1)
