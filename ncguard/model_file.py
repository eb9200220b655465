"""The model artifact: one ONNX file whose metadata says how to use and trust it.

Every exported or wrapped model carries its contract in `metadata_props` (JSON values under
`ncguard.*` keys) and a checksum over the graph and that metadata, so a loader can refuse a
tampered or foreign file before running it (DESIGN.md section 3, "Model artifact").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .atomic import atomic_write
from .errors import ModelError

PREFIX = "ncguard."
CHECKSUM_KEY = PREFIX + "checksum"
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities", "ood_score", "features")


@dataclass(frozen=True)
class DriftReference:
    """What in-distribution traffic looked like, so drift gauges can measure distances to it."""

    score_quantiles: list[float]
    class_priors: list[float]
    feature_mean: list[float]
    feature_std: list[float]

    def __post_init__(self) -> None:
        if len(self.score_quantiles) < 2:
            raise ModelError("drift reference needs at least 2 score quantiles")
        if np.any(np.diff(self.score_quantiles) < 0):
            raise ModelError("drift reference score quantiles must be non-decreasing")
        if len(self.feature_mean) != len(self.feature_std):
            raise ModelError("drift reference feature mean and std differ in length")


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    classes: list[str]
    input_shape: list[int]  # without the batch axis
    input_scale: float  # raw values were divided by this before entering the graph
    score: str
    threshold: float
    tpr: float
    drift_reference: DriftReference
    statistics_checksum: str
    run_id: str = ""
    version: str = __version__
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ModelError("model metadata lists no classes")
        if not self.input_shape or any(int(d) <= 0 for d in self.input_shape):
            raise ModelError(f"model metadata input_shape {self.input_shape} is not a valid shape")
        if not np.isfinite(self.threshold):
            raise ModelError("model metadata threshold is not a finite number")
        if not 0.0 < self.tpr < 1.0:
            raise ModelError(f"model metadata tpr {self.tpr} is not in (0, 1)")
        if len(self.drift_reference.class_priors) != len(self.classes):
            raise ModelError("drift reference class priors do not match the number of classes")

    def to_props(self) -> dict[str, str]:
        values = asdict(self)
        return {PREFIX + key: json.dumps(value) for key, value in values.items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata":
        missing = [k for k in cls.__dataclass_fields__ if PREFIX + k not in props and k not in ("run_id", "extra")]
        if missing:
            raise ModelError(
                "not an ncguard model: metadata is missing " + ", ".join(PREFIX + k for k in missing)
                + " (export it with `ncguard export` or wrap it with `ncguard fit`)"
            )
        try:
            values = {k: json.loads(props[PREFIX + k]) for k in cls.__dataclass_fields__ if PREFIX + k in props}
            values["drift_reference"] = DriftReference(**values["drift_reference"])
            return cls(**values)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelError(f"model metadata is malformed: {exc}") from exc


def model_checksum(model: onnx.ModelProto) -> str:
    """sha256 over the graph (nodes and weights) and every ncguard metadata value but the checksum."""
    digest = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for prop in sorted(model.metadata_props, key=lambda p: p.key):
        if prop.key.startswith(PREFIX) and prop.key != CHECKSUM_KEY:
            digest.update(f"\0{prop.key}\0{prop.value}".encode())
    return digest.hexdigest()


def stamp(model: onnx.ModelProto, metadata: ModelMetadata) -> onnx.ModelProto:
    """Replace the model's ncguard metadata with `metadata` and seal it with a checksum."""
    props = {p.key: p.value for p in model.metadata_props if not p.key.startswith(PREFIX)}
    props.update(metadata.to_props())
    onnx.helper.set_model_props(model, props)
    props[CHECKSUM_KEY] = model_checksum(model)
    onnx.helper.set_model_props(model, props)
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Check the graph with onnx's own checker, then write it atomically as one file (no external data)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"refusing to write an invalid ONNX graph: {exc}") from exc
    return atomic_write(path, model.SerializeToString())


@dataclass(frozen=True)
class LoadedModel:
    proto: onnx.ModelProto
    metadata: ModelMetadata
    serialized: bytes  # what ONNX Runtime is given, so the file is read once


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read an ncguard model and refuse anything foreign, tampered with or not self-contained."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError or RuntimeError depending on the corruption
        raise ModelError(f"{path} is not a readable ONNX file: {exc}") from exc
    if not proto.graph.node:
        raise ModelError(f"{path} is not a readable ONNX file: the graph is empty")
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = ModelMetadata.from_props(props)
    stored = props.get(CHECKSUM_KEY)
    if stored is None:
        raise ModelError(f"{path} carries no ncguard checksum; re-export it")
    if stored != model_checksum(proto):
        raise ModelError(f"{path} failed its checksum: the file was modified after export; re-export it")
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"{path} refers to external weight files; ncguard models are self-contained")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if INPUT_NAME not in inputs:
        raise ModelError(f"{path} has no input named {INPUT_NAME!r} (inputs: {inputs})")
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise ModelError(f"{path} lacks the outputs {missing} (outputs: {outputs})")
    return LoadedModel(proto=proto, metadata=metadata, serialized=data)
