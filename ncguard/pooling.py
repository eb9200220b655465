"""Per-channel statistics of a feature map: the one formula every multi-layer score reads blocks with.

A convolutional block's output [N, C, H, W] (or a 1-D one, [N, C, L]) is too wide and too
correlated for class means and covariances; its per-channel mean and standard deviation ([N, 2C])
are cheap low-level statistics that catch inputs whose pixels look unlike the training data (the
`fused` score's early-block component, ncguard.scores.fused).

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
