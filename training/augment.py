"""Light, label-preserving augmentation of image batches: random shifts and horizontal flips.

Random draws come from an explicit torch.Generator for the whole global batch, so a resumed run
and every DDP replica consume randomness identically (each replica then applies its own share).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ncguard.errors import ConfigError

AUGMENTATIONS = ("auto", "none", "shift", "shift-flip")


def auto_augmentation(data_name: str, input_shape: tuple[int, ...]) -> str:
    """`none` for vectors, `shift-flip` for Fashion-MNIST (clothes are left-right symmetric), else `shift`.

    Flips are not safe in general (digits, text, road signs change meaning), so only the data set
    known to tolerate them gets them.
    """
    if len(input_shape) != 3:
        return "none"
    return "shift-flip" if data_name.startswith("fashion-mnist") else "shift"


class Augmentation:
    """`draw(n, generator)` random parameters for n images, `apply(x, params)` to a batch [n, C, H, W]."""

    def __init__(self, kind: str, input_shape: tuple[int, ...]):
        if kind not in AUGMENTATIONS or kind == "auto":
            raise ConfigError(f"unknown augmentation {kind!r}: choose one of {', '.join(AUGMENTATIONS)}")
        if kind != "none" and len(input_shape) != 3:
            raise ConfigError(f"augmentation {kind!r} needs images [C, H, W], got input shape {list(input_shape)}: use none")
        self.kind = kind
        self.input_shape = tuple(input_shape)
        # At most 1 pixel of shift per 12 (2 px on 28x28, 1 px on 8x8): a light translation.
        self.pad = max(1, min(input_shape[1:]) // 12) if kind != "none" else 0

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.kind == "none":
            return {}
        params = {"offsets": torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)}
        if self.kind == "shift-flip":
            params["flip"] = torch.rand(n, generator=generator) < 0.5
        return params

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "none":
            return x
        n, _, height, width = x.shape
        padded = F.pad(x, (self.pad,) * 4)  # zero padding: the background of [0, 1] images
        offsets = params["offsets"].to(x.device)
        rows = offsets[:, 0:1] + torch.arange(height, device=x.device)  # [n, H]
        cols = offsets[:, 1:2] + torch.arange(width, device=x.device)  # [n, W]
        if "flip" in params:
            flipped = cols.flip(1)
            cols = torch.where(params["flip"].to(x.device)[:, None], flipped, cols)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]

    def slice(self, params: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
        return {name: value[index] for name, value in params.items()}
