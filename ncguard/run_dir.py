"""The run directory `ncguard train` writes, as far as torch-free readers need it.

File names, the config format and a JSON reader whose errors name the file and what to do.
`training.runs` adds the torch side (rebuilding the model); `ncguard collapse` needs only this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

RUN_FORMAT = "ncguard-run-1"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class RunFiles:
    """The file names inside a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.root / "model.pt"

    @property
    def statistics(self) -> Path:
        return self.root / "statistics.npz"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def collapse(self) -> Path:
        return self.root / "collapse.json"


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
    except FileNotFoundError:
        raise ModelError(f"{path} not found: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not readable JSON ({exc}): the run directory is damaged") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run, checked for the keys everything else relies on."""
    files = RunFiles(Path(run_dir))
    if not files.root.is_dir():
        raise ModelError(f"run directory not found: {files.root}")
    config = read_json(files.config, "not an ncguard run directory (write one with `ncguard train`)")
    if config.get("format") != RUN_FORMAT:
        raise ModelError(f"{files.config} is not an ncguard run config (format {config.get('format')!r}, expected {RUN_FORMAT!r})")
    required = {
        "settings": ("arch", "head", "classifier", "layers", "score", "seed", "calibration_fraction"),
        "data": ("spec", "classes", "input_shape", "input_scale", "n_samples"),
    }
    for section, keys in required.items():
        missing = [key for key in keys if key not in config.get(section, {})]
        if missing:
            raise ModelError(f"{files.config} lacks {section} entries {', '.join(missing)}: the run directory is damaged")
    if "run_id" not in config:
        raise ModelError(f"{files.config} has no run_id: the run directory is damaged")
    return config
