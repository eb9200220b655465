"""The dual-head model: backbone -> transfer features h; frozen ETF projector -> detection features z.

DESIGN.md section 1. Heads:
- `etf`: z = P(h) / ||P(h)||, P = Linear(d, 4d) -> ReLU -> Linear(4d, d), both with fixed
  simplex-ETF weights (requires_grad False, never given to the optimizer); logits = g(z).
- `plain`: z = h, logits = g(h): the plain cross-entropy baseline on the same backbone.
- `l2`: z = h / ||h||, logits = g(z): the L2-normalized-feature model of Haas et al.
g is a learned linear layer, or (`classifier="simplex"`) the fixed class-simplex W* of etf.py.
Input normalization (per-channel mean/std of the training set) is a buffer, so exports embed it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ncguard import pooling
from ncguard.errors import ConfigError, DataError

from .backbones import Backbone, build_backbone
from .etf import simplex_classifier, simplex_etf

HEADS = ("etf", "plain", "l2")
CLASSIFIERS = ("learned", "simplex")
PROJECTOR_EXPANSION = 4
# Logits of a fixed classifier on unit-norm features lie in [-1, 1]; cross-entropy needs a wider
# range, so they are scaled by a constant (the usual cosine-classifier temperature, NormFace).
SIMPLEX_LOGIT_SCALE = 16.0


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [N, C]
    transfer: torch.Tensor  # h [N, d]
    detection: torch.Tensor  # z [N, d]


def normalization_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (images [N, C, H, W]) or per-feature (vectors [N, D]) mean and std, float32.

    Computed in float64 chunk by chunk; a constant channel gets std 1 (it carries no signal, and
    dividing by zero would turn it into NaN).
    """
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"normalization needs a non-empty batch [N, ...], got shape {x.shape}")
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    total = np.zeros(x.shape[1:] if x.ndim != 4 else (x.shape[1],), dtype=np.float64)
    total_sq = np.zeros_like(total)
    count = 0
    for start in range(0, x.shape[0], 4096):
        chunk = np.asarray(x[start:start + 4096], dtype=np.float64)
        total += chunk.sum(axis=axes)
        total_sq += (chunk**2).sum(axis=axes)
        count += chunk.size // total.size
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def block_statistics(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C * grid^2 + 2C]: each channel's means on a grid x grid grid, then its mean
    and (population) standard deviation, by the core's one formula (`ncguard.pooling.block_statistics`,
    run on torch tensors); `ncguard fit` pools a foreign model's feature maps with the same lines
    (grid 0, `channel_mean_std`)."""
    return pooling.block_statistics(maps, grid, torch)


class DualHeadModel(nn.Module):
    """Backbone, input normalization, detection head and classifier; see the module docstring."""

    def __init__(
        self,
        backbone: Backbone,
        n_classes: int,
        input_shape: tuple[int, ...],
        head: str = "etf",
        classifier: str = "learned",
        input_mean: np.ndarray | None = None,
        input_std: np.ndarray | None = None,
        block_grid: int = pooling.UNRECORDED_BLOCK_GRID,
    ):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"unknown classifier {classifier!r}: choose one of {', '.join(CLASSIFIERS)}")
        if n_classes < 2:
            raise DataError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.backbone = backbone
        self.block_grid = pooling.check_block_grid(block_grid)
        self.head = head
        self.classifier_kind = classifier
        self.n_classes = int(n_classes)
        self.input_shape = tuple(int(d) for d in input_shape)
        dim = backbone.feature_dim
        self.feature_dim = dim

        stat_shape = (1, self.input_shape[0], 1, 1) if len(self.input_shape) == 3 else (1, *self.input_shape)
        mean = torch.zeros(stat_shape) if input_mean is None else torch.as_tensor(input_mean, dtype=torch.float32).reshape(stat_shape)
        std = torch.ones(stat_shape) if input_std is None else torch.as_tensor(input_std, dtype=torch.float32).reshape(stat_shape)
        self.register_buffer("input_mean", mean)
        self.register_buffer("input_std", std)

        self.projector = None
        if head == "etf":
            expand = nn.Linear(dim, PROJECTOR_EXPANSION * dim, bias=False)
            reduce = nn.Linear(PROJECTOR_EXPANSION * dim, dim, bias=False)
            with torch.no_grad():
                expand.weight.copy_(simplex_etf(PROJECTOR_EXPANSION * dim, dim))
                reduce.weight.copy_(simplex_etf(dim, PROJECTOR_EXPANSION * dim))
            self.projector = nn.Sequential(expand, nn.ReLU(), reduce)
            self.projector.requires_grad_(False)

        if classifier == "learned":
            self.classifier = nn.Linear(dim, n_classes)
        else:
            self.classifier = None
            scale = SIMPLEX_LOGIT_SCALE if head != "plain" else 1.0
            self.register_buffer("simplex_weight", simplex_classifier(n_classes, dim) * scale)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def detection_features(self, h: torch.Tensor) -> torch.Tensor:
        if self.head == "plain":
            return h
        if self.head == "etf":
            return F.normalize(self.projector(h), dim=1)
        return F.normalize(h, dim=1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        if self.classifier is not None:
            return self.classifier(z)
        return z @ self.simplex_weight.T

    def forward(self, x: torch.Tensor) -> ModelOutput:
        h = self.backbone(self.normalize_input(x))
        z = self.detection_features(h)
        return ModelOutput(self.classify(z), h, z)

    def layer_features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Flat features of every named layer: early blocks, "transfer" (h), "detection" (z), "logits".

        Feature maps [N, C, H, W] are pooled per channel by `block_statistics`: means on a
        `block_grid` x `block_grid` grid, then [mean, std] over the whole map ([N, C * grid^2 + 2C]):
        cheap low-level statistics that catch inputs whose pixels, or whose layout, look unlike the
        training data.
        """
        blocks = self.backbone.forward_features(self.normalize_input(x))
        h = blocks.pop(next(reversed(blocks)))
        layers = OrderedDict()
        for name, value in blocks.items():
            layers[name] = block_statistics(value, self.block_grid) if value.ndim == 4 else value
        z = self.detection_features(h)
        layers["transfer"] = h
        layers["detection"] = z
        layers["logits"] = self.classify(z)
        return layers

    def classifier_weight(self) -> torch.Tensor:
        """The classifier weight [C, d] as a tensor in the graph (the NC loss needs its gradient)."""
        return self.classifier.weight if self.classifier is not None else self.simplex_weight

    def classifier_weight_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """The effective linear classifier on z as float64 (W [C, d], b [C]): logits = z W^T + b."""
        if self.classifier is not None:
            weight = self.classifier.weight.detach().double().cpu().numpy()
            bias = self.classifier.bias.detach().double().cpu().numpy()
        else:
            weight = self.simplex_weight.detach().double().cpu().numpy()
            bias = np.zeros(self.n_classes)
        return weight, bias

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if not p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    head: str = "etf",
    classifier: str = "learned",
    input_mean: np.ndarray | None = None,
    input_std: np.ndarray | None = None,
    block_grid: int = pooling.UNRECORDED_BLOCK_GRID,
) -> DualHeadModel:
    """A DualHeadModel with the named backbone (what load_run uses to rebuild a run's model)."""
    backbone = build_backbone(arch, input_shape)
    return DualHeadModel(backbone, n_classes, input_shape, head, classifier, input_mean, input_std, block_grid)
