"""The model artifact: one ONNX file whose metadata says how to use and trust it.

Every exported or wrapped model carries its contract in `metadata_props` (JSON values under
`ncguard.*` keys) and a checksum over the graph and that metadata, so a loader can refuse a
damaged or foreign file before running it (DESIGN.md section 3, "Model artifact").

What the checksum protects against: accidents (a truncated copy, a flipped bit, a hand edit that
did not recompute it). Not deliberate edits: it is an unkeyed sha256 that anyone can recompute
with `model_checksum`. Against those, a model can carry an Ed25519 signature (`ncguard.signature`,
ncguard.signing) over the same bytes, which a loader given the public key verifies.

Loading order: the file is checked as a file, then as ONNX, then its checksum (and signature when
a key is given), and only then is its metadata parsed, so a file that was edited is reported as
edited rather than failing somewhere inside the metadata parser; and the parser checks every
value's type, naming the key, so no metadata makes a consumer crash with a traceback.
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
SIGNATURE_KEY = PREFIX + "signature"
UNSEALED_KEYS = (CHECKSUM_KEY, SIGNATURE_KEY)  # the seals themselves are not part of what they seal
SIGNATURE_DOMAIN = b"ncguard model signature v1\0"  # a signature over a model can never be mistaken for one over other bytes
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities", "ood_score", "features")
# Each part of the OOD score, [N, K], named by ModelMetadata.ood_components (what drove a decision).
# Optional when loading: files exported before it existed have no such output.
COMPONENTS_OUTPUT = "ood_components"


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
    # softmax temperature folded into `probabilities` (ncguard.temperature); files written before it
    # existed have none and load as 1.0, what their graphs compute
    temperature: float = 1.0
    # "layer:score" of each column of the `ood_components` output (older files: none, no such output)
    ood_components: list[str] = field(default_factory=list)

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
        if not (_number(self.temperature) and self.temperature > 0):
            raise ModelError(f"model metadata temperature {self.temperature!r} is not a positive number")

    def to_props(self) -> dict[str, str]:
        values = asdict(self)
        return {PREFIX + key: json.dumps(value) for key, value in values.items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMetadata":
        missing = [k for k in cls.__dataclass_fields__ if PREFIX + k not in props and k not in ("run_id", "extra", "temperature", "ood_components")]
        if missing:
            raise ModelError(
                "not an ncguard model: metadata is missing " + ", ".join(PREFIX + k for k in missing)
                + " (export it with `ncguard export` or wrap it with `ncguard fit`)"
            )
        values = {}
        for k in cls.__dataclass_fields__:
            if PREFIX + k in props:
                try:
                    values[k] = json.loads(props[PREFIX + k])
                except (ValueError, RecursionError) as exc:
                    raise ModelError(f"model metadata {PREFIX + k} is not valid JSON: {exc}") from None
        for k, value in values.items():
            check = _METADATA_TYPES[k]
            if not check[0](value):
                raise ModelError(f"model metadata {PREFIX + k} must be {check[1]}, got {_shown(value)}")
        reference = values["drift_reference"]
        wrong = sorted(set(reference) ^ set(DriftReference.__dataclass_fields__))
        if wrong:
            raise ModelError(f"model metadata {PREFIX}drift_reference must have exactly the fields "
                             f"{', '.join(DriftReference.__dataclass_fields__)}; it differs in {', '.join(map(repr, wrong))}")
        for field_name, field_value in reference.items():
            if not _finite_numbers(field_value):
                raise ModelError(f"model metadata {PREFIX}drift_reference.{field_name} must be a list of finite numbers, got {_shown(field_value)}")
        try:
            values["drift_reference"] = DriftReference(**reference)
            return cls(**values)
        except ModelError as exc:
            raise ModelError(f"model metadata is inconsistent: {exc}") from None


def _shown(value, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _finite_numbers(v) -> bool:
    return isinstance(v, list) and all(_number(x) for x in v)


def _strings(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


def _shape(v) -> bool:
    return (isinstance(v, list) and 1 <= len(v) <= 32
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in v))


# (check, what it must be): the JSON type of every metadata value, checked before any is used
_METADATA_TYPES = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "classes": (_strings, "a non-empty list of class names (strings)"),
    "input_shape": (_shape, "a list of 1 to 32 positive whole numbers (the input shape without the batch axis)"),
    "input_scale": (lambda v: _number(v) and v > 0, "a positive number"),
    "score": (lambda v: isinstance(v, str), "a string"),
    "threshold": (_number, "a finite number"),
    "tpr": (_number, "a number in (0, 1)"),
    "drift_reference": (lambda v: isinstance(v, dict), "an object"),
    "statistics_checksum": (lambda v: isinstance(v, str), "a string"),
    "run_id": (lambda v: isinstance(v, str), "a string"),
    "version": (lambda v: isinstance(v, str), "a string"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
    "temperature": (lambda v: _number(v) and v > 0, "a positive number"),
    "ood_components": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of component names (strings)"),
}


def _sealed_parts(model: onnx.ModelProto):
    """What the checksum and the signature cover: the graph (nodes and weights) and every ncguard
    metadata value but the seals, in key order."""
    yield model.graph.SerializeToString(deterministic=True)
    for prop in sorted(model.metadata_props, key=lambda p: p.key):
        if prop.key.startswith(PREFIX) and prop.key not in UNSEALED_KEYS:
            yield f"\0{prop.key}\0{prop.value}".encode()


def model_checksum(model: onnx.ModelProto) -> str:
    """sha256 over the graph (nodes and weights) and every ncguard metadata value but the seals.

    Unkeyed: it detects accidental damage, not deliberate edits (anyone can recompute it); see
    `sign_model` for that.
    """
    digest = hashlib.sha256()
    for part in _sealed_parts(model):
        digest.update(part)
    return digest.hexdigest()


def signed_message(model: onnx.ModelProto) -> bytes:
    """The bytes a model signature covers: a domain tag, the checksum's bytes, and the two
    model-level fields outside the graph that change what the graph computes (the operator set
    versions, and model-local functions, which ncguard never writes but a loader would run)."""
    parts = [SIGNATURE_DOMAIN, *_sealed_parts(model), b"\0opsets\0"]
    parts += [f"{o.domain}\0{o.version}\0".encode() for o in sorted(model.opset_import, key=lambda o: o.domain)]
    parts.append(b"\0functions\0")
    parts += [f.SerializeToString(deterministic=True) for f in model.functions]
    return b"".join(parts)


def sign_model(model: onnx.ModelProto, key) -> onnx.ModelProto:
    """Add an Ed25519 signature (`ncguard.signature`) to a stamped model; `key` is an
    Ed25519PrivateKey or the path of its PEM file. The checksum stays valid: it excludes the seals."""
    from .signing import load_private_key, sign

    if isinstance(key, (str, os.PathLike)):
        key = load_private_key(key)
    props = {p.key: p.value for p in model.metadata_props if p.key != SIGNATURE_KEY}
    if CHECKSUM_KEY not in props:
        raise ModelError("sign_model needs a stamped model (ncguard metadata and checksum); stamp it first")
    onnx.helper.set_model_props(model, props)
    props[SIGNATURE_KEY] = sign(key, signed_message(model))
    onnx.helper.set_model_props(model, props)
    return model


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


def load_model(path: str | os.PathLike, *, verify_key=None) -> LoadedModel:
    """Read an ncguard model and refuse anything foreign, damaged, not self-contained or, when
    `verify_key` is given (an Ed25519PublicKey or the path of its PEM file), not signed with it."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a model file (give the .onnx file that `ncguard export` wrote)")
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if verify_key is not None and isinstance(verify_key, (str, os.PathLike)):
        from .signing import load_public_key

        verify_key = load_public_key(verify_key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError or RuntimeError depending on the corruption
        raise ModelError(f"{path} is not a readable ONNX file: {exc}") from exc
    if not proto.graph.node:
        raise ModelError(f"{path} is not a readable ONNX file: the graph is empty")
    props = {p.key: p.value for p in proto.metadata_props}
    if not any(key.startswith(PREFIX) for key in props):
        raise ModelError(f"{path} is not an ncguard model: it has no ncguard metadata "
                         "(export it with `ncguard export` or wrap it with `ncguard fit`)")
    # seals first: an edited file is reported as edited, whatever its metadata now says
    stored = props.get(CHECKSUM_KEY)
    if stored is None:
        raise ModelError(f"{path} carries no ncguard checksum; re-export it")
    if stored != model_checksum(proto):
        raise ModelError(f"{path} failed its checksum: the file was modified after export; re-export it")
    if verify_key is not None:
        from .signing import verify

        verify(verify_key, props.get(SIGNATURE_KEY), signed_message(proto), str(path))
    metadata = ModelMetadata.from_props(props)
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
    if metadata.ood_components and COMPONENTS_OUTPUT not in outputs:
        raise ModelError(f"{path} names OOD components in its metadata but has no {COMPONENTS_OUTPUT!r} output")
    return LoadedModel(proto=proto, metadata=metadata, serialized=data)
