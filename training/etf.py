"""Fixed simplex-ETF weights: the frozen projector and the optional fixed class-simplex classifier.

DESIGN.md section 1: E = sqrt(c/(c-1)) (I_c - 11^T/c), restricted to a layer's [rows, cols]
shape with the rectangular identity, c = max(rows, cols). The restriction keeps the simplex form
along the shorter side: for a tall E (rows > cols) E^T E = c/(c-1) (I - 11^T/c), and E E^T for
a wide one, i.e. unit vectors whose pairwise cosines are all -1/(c-1).
"""

from __future__ import annotations

import math

import torch

from ncguard.errors import ConfigError


def simplex_etf(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E restricted to [rows, cols]: sqrt(c/(c-1)) (I_{rows x cols} - 1_rows 1_cols^T / c), c = max(rows, cols)."""
    if rows < 1 or cols < 1 or max(rows, cols) < 2:
        raise ConfigError(f"a simplex ETF needs width >= 2, got a [{rows}, {cols}] layer")
    width = max(rows, cols)
    identity = torch.eye(rows, cols, dtype=torch.float64)
    etf = math.sqrt(width / (width - 1)) * (identity - 1.0 / width)
    return etf.to(dtype)


def simplex_classifier(n_classes: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed class-simplex classifier weight [C, d]: rows of W* = sqrt(C/(C-1)) U (I_C - 11^T/C).

    U [d, C] has orthonormal columns (QR of a seeded Gaussian), so the C class directions are
    unit vectors at pairwise cosine -1/(C-1) inside a generic C-dimensional subspace of R^d.
    """
    if n_classes < 2:
        raise ConfigError(f"a class-simplex classifier needs at least 2 classes, got {n_classes}")
    if dim < n_classes:
        raise ConfigError(f"a class-simplex classifier needs feature dim >= classes, got dim {dim} < {n_classes} classes")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, n_classes, generator=generator, dtype=torch.float64)
    orthonormal, _ = torch.linalg.qr(gaussian)  # [d, C], orthonormal columns
    centering = torch.eye(n_classes, dtype=torch.float64) - 1.0 / n_classes
    weight = math.sqrt(n_classes / (n_classes - 1)) * orthonormal @ centering  # [d, C]
    return weight.T.contiguous().to(dtype)
