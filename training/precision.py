"""Training precision: fp32, or bfloat16 autocast where the CPU has native bfloat16 arithmetic.

Why bf16 on CPU (issue 16, training time): on a CPU with AVX512-BF16 or AMX, oneDNN runs the
convolutions and matrix products of a training step in bfloat16, about 1.4x faster than fp32 for
the default cnn (Fashion-MNIST, batch 128, 2 cores: 61-62 ms -> 43 ms a step in isolation; whole
epochs gain less, see benchmarks/results/train_time.md, which also gives the accuracy effect).
Autocast keeps the weights, the optimizer state, batch norm and the loss in fp32 (torch's CPU
autocast op lists), so only the products' inputs are rounded. The trained model is an ordinary
fp32 model: statistics, export and serving never see bf16.

`auto` picks bf16 on such a CPU and fp32 everywhere else (CUDA included: untested here, so
unchanged); the resolved choice is recorded in config.json and in the checkpoint, so a resumed run
keeps the precision it started with.
"""

from __future__ import annotations

import torch

from ncguard.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
CHOICES = ("auto", *PRECISIONS)
# What runs and checkpoints written before the setting existed were trained with: a --resume of one
# compares against this, not against today's `auto`.
UNRECORDED_PRECISION = "fp32"


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN reports native bfloat16 support (AVX512-BF16 or AMX) on this CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe: assume no
        return False


def resolve_precision(choice: str, device: torch.device) -> str:
    """auto -> bf16 on a CPU with native bfloat16, else fp32; an explicit choice is checked."""
    if choice not in CHOICES:
        raise ConfigError(f"--precision {choice!r} is not one of: {', '.join(CHOICES)}")
    if choice == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if choice == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        raise ConfigError("--precision bf16: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX); "
                          "it would train slower than fp32. Use --precision fp32 or auto")
    return choice


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The context a training step's forward pass and loss run in (autocast off for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
