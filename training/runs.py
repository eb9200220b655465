"""Reading a run directory written by `ncguard train`: the model, its config and its statistics.

`load_run(run_dir)` is what export uses; every missing, corrupt or mismatched file is a
ModelError that names the file and what to do about it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ncguard.calibration import split_for_calibration
from ncguard.data import load_dataset
from ncguard.errors import DataError, ModelError, NcguardError
from ncguard.pooling import UNRECORDED_BLOCK_GRID
from ncguard.run_dir import RunFiles, read_config
from ncguard.stats import StatisticsBundle

from .model import DualHeadModel, build_model
from .precision import UNRECORDED_PRECISION

# What a run written before a setting existed was trained with (its config.json lacks the key), so
# --resume of such a run compares against the value it really used, and readers rebuild it as it was.
SETTINGS_BEFORE_THEY_WERE_RECORDED = {"precision": UNRECORDED_PRECISION, "block_grid": UNRECORDED_BLOCK_GRID}


def run_settings(config: dict) -> dict:
    """A run's settings from its config.json, with the values it trained with for settings it predates."""
    return {**SETTINGS_BEFORE_THEY_WERE_RECORDED, **config["settings"]}

def model_from_config(config: dict) -> DualHeadModel:
    """An untrained model with the run's architecture (weights come from model.pt or a checkpoint)."""
    settings, data = run_settings(config), config["data"]
    try:
        return build_model(
            settings["arch"], tuple(data["input_shape"]), len(data["classes"]), settings["head"], settings["classifier"],
            block_grid=settings["block_grid"],
        )
    except NcguardError as exc:
        raise ModelError(f"the run config describes a model that cannot be built: {exc}") from None


def load_state_dict(path: Path) -> dict:
    """A state_dict saved with torch.save, read without unpickling code (weights_only=True)."""
    if not path.is_file():
        raise ModelError(
            f"{path} not found: training did not finish; continue it with `ncguard train ... --resume`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many exception types for truncated or foreign files
        raise ModelError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelError(f"{path} is not a model state_dict")
    return state


def load_run(run_dir: str | os.PathLike) -> tuple[DualHeadModel, dict, StatisticsBundle]:
    """(model in eval mode with the trained weights, config dict, StatisticsBundle) of a finished run."""
    files = RunFiles(Path(run_dir))
    config = read_config(files.root)
    model = model_from_config(config)
    state = load_state_dict(files.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{files.model} does not match the model described in {files.config}: {exc}") from None
    bundle = StatisticsBundle.load(files.statistics)
    if bundle.meta.get("run_id") != config["run_id"]:
        raise ModelError(
            f"{files.statistics} belongs to run {bundle.meta.get('run_id')!r}, not to this run {config['run_id']!r}"
        )
    if list(bundle.classes) != list(config["data"]["classes"]):
        raise ModelError(f"{files.statistics} and {files.config} disagree on the class names")
    return model.eval(), config, bundle


def calibration_split(config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(fit_index, calibration_index) into the run's training data, exactly as training split it."""
    data = config["data"]
    return split_for_calibration(int(data["n_samples"]), float(data["calibration_fraction"]), int(data["calibration_seed"]))


def calibration_inputs(config: dict, *, with_labels: bool = False):
    """(held-out ID inputs, input scale): the split training held out, redrawn from config.json;
    with_labels: (inputs, their labels, input scale), the labels fitting the softmax temperature."""
    data = config["data"]
    dataset = load_dataset(data["spec"])
    if int(data["n_samples"]) != len(dataset):
        raise DataError(
            f"the run was trained on {data['n_samples']} samples of {data['spec']}, but it now holds {len(dataset)}: "
            "the held-out calibration split cannot be redrawn (did the data change?)"
        )
    try:
        _, calibration_index = calibration_split(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"the run's config.json does not say how the calibration split was drawn ({exc})") from None
    if with_labels:
        return dataset.x[calibration_index], dataset.y[calibration_index], float(dataset.input_scale)
    return dataset.x[calibration_index], float(dataset.input_scale)
