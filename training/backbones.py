"""Backbones f(x) -> h: a small CNN (default), a CIFAR-style ResNet-18, an MLP, and an adapter.

Every backbone has `feature_dim` and `forward_features(x) -> dict[str, Tensor]`: the named block
outputs in order, the last being the flat transfer features h [N, feature_dim]. Earlier entries
may be feature maps [N, C, H, W] so that scores can pool early convolutional layers.
torchvision is not a dependency, so ResNet-18 is written out here (BasicBlock, 2-2-2-2).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ncguard.errors import ConfigError, ModelError
from ncguard.pooling import grid_pooling_matrix

ARCHITECTURES = ("cnn", "cnn-linear", "resnet18", "mlp")
MIN_IMAGE_SIZE = 8


class Backbone(nn.Module):
    """Base: `forward` is the last entry of `forward_features`."""

    feature_dim: int

    def forward_features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(reversed(self.forward_features(x).values()))


class GridAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d whose exported graph is one matrix product.

    Why: torch's ONNX exporter writes an adaptive pooling whose windows overlap (7x7 -> 4x4 in the
    default cnn) as a GatherND, a Transpose and two Where nodes over the whole feature map: about a
    third of the exported network's time at batch 64 (ONNX Runtime profiler, issue 16). With H and W
    fixed at export time the same average is the flattened map times the constant [H*W, h*w] matrix
    kron(P_h, P_w)^T (`ncguard.pooling.grid_pooling_matrix`): one GEMM over all images and channels. Training
    keeps torch's own kernel; the values agree up to float rounding (tests/test_training_model.py),
    and the module has no parameters, so state dicts of either kind load into the other.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            return super().forward(x)
        height, width = x.shape[-2:]
        out_h, out_w = (self.output_size, self.output_size) if isinstance(self.output_size, int) else self.output_size
        out_h, out_w = out_h or height, out_w or width
        kernel = x.new_tensor(grid_pooling_matrix((height, width), (out_h, out_w)))
        return torch.matmul(x.flatten(2), kernel).unflatten(2, (out_h, out_w))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(Backbone):
    """Three conv-BN-ReLU stages (32; 64; 128, 128 channels; max pooling after the first two),
    then adaptive average pooling to a 4x4 grid and a fully connected layer to h (256-d).

    Sized for 2 CPU cores (~15M multiply-adds per 28x28 image, ~45 s per Fashion-MNIST epoch).
    Full resolution gets a single cheap convolution. Keeping a coarse 4x4 grid instead of global
    pooling keeps where-things-are information that small images need; the adaptive pooling and
    ceil_mode make any H, W >= 8 work. `final_relu=False` (`--arch cnn-linear`) leaves h signed: the
    quality benchmark found the ETF head's h loses most of its transfer in that last ReLU.
    """

    def __init__(
        self, in_channels: int, widths: tuple[int, int, int] = (32, 64, 128), grid: int = 4, feature_dim: int = 256, final_relu: bool = True
    ):
        super().__init__()
        w1, w2, w3 = widths
        self.block1 = nn.Sequential(_conv_bn_relu(in_channels, w1), nn.MaxPool2d(2, ceil_mode=True))
        self.block2 = nn.Sequential(_conv_bn_relu(w1, w2), nn.MaxPool2d(2, ceil_mode=True))
        self.block3 = nn.Sequential(_conv_bn_relu(w2, w3), _conv_bn_relu(w3, w3))
        self.head = nn.Sequential(
            GridAvgPool2d(grid),
            nn.Flatten(),
            nn.Linear(w3 * grid * grid, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            *([nn.ReLU(inplace=True)] if final_relu else []),
        )
        self.feature_dim = feature_dim

    def forward_features(self, x):
        block1 = self.block1(x)
        block2 = self.block2(block1)
        block3 = self.block3(block2)
        return OrderedDict(block1=block1, block2=block2, block3=block3, features=self.head(block3))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(Backbone):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max pooling, stages of 64-128-256-512."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, widths[0])
        stages, previous = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(previous, width, stride), BasicBlock(width, width, 1)))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]

    def forward_features(self, x):
        outputs = OrderedDict()
        out = self.stem(x)
        for index, stage in enumerate(self.stages, start=1):
            out = stage(out)
            outputs[f"block{index}"] = out
        outputs["features"] = torch.flatten(self.pool(out), 1)
        return outputs


class MLP(Backbone):
    """Fully connected layers with batch norm for vector inputs (embeddings, tabular features)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (512, 256)):
        super().__init__()
        layers, previous = [], in_features
        for width in hidden:
            layers.append(nn.Sequential(nn.Linear(previous, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)))
            previous = width
        self.blocks = nn.ModuleList(layers)
        self.feature_dim = hidden[-1]

    def forward_features(self, x):
        out = torch.flatten(x, 1)
        outputs = OrderedDict()
        for index, block in enumerate(self.blocks, start=1):
            out = block(out)
            outputs[f"block{index}"] = out
        outputs["features"] = outputs.pop(f"block{len(self.blocks)}")
        return outputs


class ModuleBackbone(Backbone):
    """Adapter for any torch.nn.Module that maps a batch to flat features [N, feature_dim]."""

    def __init__(self, module: nn.Module, feature_dim: int):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ModelError(f"ModuleBackbone needs a torch.nn.Module, got {type(module).__name__}")
        if int(feature_dim) < 2:
            raise ConfigError(f"feature_dim must be >= 2, got {feature_dim}")
        self.module = module
        self.feature_dim = int(feature_dim)

    def forward_features(self, x):
        features = self.module(x)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != self.feature_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ModelError(
                f"the wrapped {type(self.module).__name__} must return flat features [N, {self.feature_dim}], got {shape}"
            )
        return OrderedDict(features=features)


def build_backbone(arch: str, input_shape: tuple[int, ...]) -> Backbone:
    """The named backbone for inputs of shape input_shape (without the batch axis)."""
    input_shape = tuple(int(d) for d in input_shape)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if arch == "mlp":
        if len(input_shape) not in (1, 3):
            raise ConfigError(f"--arch mlp needs vectors [D] or images [C, H, W], got input shape {list(input_shape)}")
        in_features = 1
        for d in input_shape:
            in_features *= d
        return MLP(in_features)
    if len(input_shape) != 3:
        raise ConfigError(
            f"--arch {arch} needs images [C, H, W], got input shape {list(input_shape)}: use --arch mlp for vectors"
        )
    channels, height, width = input_shape
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise ConfigError(f"--arch {arch} needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got {height}x{width}")
    if arch == "cnn-linear":
        return SmallCNN(channels, final_relu=False)
    return SmallCNN(channels) if arch == "cnn" else ResNet18(channels)
