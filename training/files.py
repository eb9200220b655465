"""Run-directory writers (JSON, torch checkpoints) on top of ncguard.atomic: a reader, or a run
resumed after a crash, sees either the old file or the new one, never half."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from ncguard.atomic import atomic_write


def atomic_write_json(path: str | os.PathLike, value) -> Path:
    return atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike, value) -> Path:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return atomic_write(path, buffer.getvalue())
