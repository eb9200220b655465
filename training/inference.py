"""Batched, gradient-free passes of a trained model over a NumPy array, chunk by chunk.

Everything after training (class statistics, NC4, calibration scores, test accuracy, the NC1
probe) streams through here, so no full feature matrix is ever held in memory.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ncguard.data import iter_batches

from .model import DualHeadModel

INFERENCE_BATCH_SIZE = 512


def iter_layer_features(
    model: DualHeadModel,
    x: np.ndarray,
    layers: tuple[str, ...] | None = None,
    batch_size: int = INFERENCE_BATCH_SIZE,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
    """Yield (rows, {layer: float32 [n, D]}) over x in eval mode; `layers` None means all layers.

    The model is put in eval mode for the pass and back in its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for rows in iter_batches(len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[rows])).to(device)
                features = model.layer_features(batch)
                names = features.keys() if layers is None else layers
                yield rows, {name: features[name].float().cpu().numpy() for name in names}
    finally:
        model.train(was_training)


def collect_layer_features(
    model: DualHeadModel, x: np.ndarray, layers: tuple[str, ...], batch_size: int = INFERENCE_BATCH_SIZE, device="cpu", desc: str | None = None
) -> dict[str, np.ndarray]:
    """{layer: float32 [N, D]} over all of x (a progress bar when `desc` is given)."""
    from tqdm import tqdm

    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    batches = iter_layer_features(model, np.asarray(x, dtype=np.float32), layers, batch_size=batch_size, device=device)
    total = -(-len(x) // batch_size)
    for _, features in tqdm(batches, total=total, desc=desc, unit="batch", leave=False, disable=True if desc is None else None):  # None: off when not a terminal
        for layer in layers:
            parts[layer].append(features[layer])
    return {layer: np.concatenate(values) for layer, values in parts.items()}


def fit_on_held_out(detector, bundle, model: DualHeadModel, held_out_x: np.ndarray, device="cpu"):
    """Fit `detector` (from `ncguard.scores.build_detector`) on a run; returns it.

    The one place every torch path (export, `evaluate --all-scores`, benchmarks) fits a run's
    detector: from the run's class statistics, plus, for a detector that needs them
    (`needs_held_out`, e.g. "fused"), the held-out ID inputs' features as torch computes them.
    """
    held_out = collect_layer_features(model, held_out_x, detector.layers, device=device) if detector.needs_held_out else None
    return detector.fit(bundle, held_out)


def accuracy_and_loss(model: DualHeadModel, x: np.ndarray, y: np.ndarray, device="cpu") -> tuple[float, float]:
    """(accuracy, mean plain cross-entropy) of the model on (x, y): the test-set numbers."""
    correct, total_loss = 0, 0.0
    for rows, features in iter_layer_features(model, x, ("logits",), device=device):
        logits = torch.from_numpy(features["logits"]).double()
        labels = torch.from_numpy(np.asarray(y[rows], dtype=np.int64))
        correct += int((logits.argmax(dim=1) == labels).sum())
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return correct / len(x), total_loss / len(x)
