"""`ncguard predict MODEL.onnx FILE...`: label, confidence, OOD score and decision per input, no server.

Reads PNG/JPEG images (decoded to the model's channels and size), `.npy` arrays (one input or a
batch) and `.npz` files (array `x`, plus an optional string array `kind` printed beside each row).
Everything runs through `ncguard.runtime.Predictor`, as the service does. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..images import IMAGE_SUFFIXES, decode_image
from ..runtime import PROVIDER_CHOICES, Predictor
from ..signing import verify_key_path


@dataclass(frozen=True)
class Inputs:
    """Inputs gathered from the files, with where each row came from."""

    x: np.ndarray  # [N, *input_shape]
    sources: list[str]  # "file" or "file[i]" per row
    kinds: list[str]  # the .npz `kind` value per row, "" when none


def _read_array(path: Path, array: np.ndarray, input_shape: tuple[int, ...], what: str) -> np.ndarray:
    if array.dtype.kind not in "fiub":
        raise DataError(f"{what} in {path} must hold numbers, got dtype {array.dtype}")
    if array.shape == input_shape:
        return array[None]
    if array.shape[1:] == input_shape:
        if len(array) == 0:
            raise DataError(f"{what} in {path} holds no inputs")
        return array
    raise DataError(
        f"{what} in {path} has shape {list(array.shape)}; the model takes one input of shape {list(input_shape)} "
        f"or a batch [N, {', '.join(map(str, input_shape))}]"
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a .npy array (object arrays are refused): {exc}") from None


def _load_npz(path: Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            x = npz["x"] if "x" in names else None
            kinds = npz["kind"] if "kind" in names else None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} as a .npz file (object arrays are refused): {exc}") from None
    if x is None:
        raise DataError(f"{path} has no array named 'x' (it holds: {', '.join(names) or 'nothing'})")
    x = _read_array(path, x, input_shape, "array 'x'")
    if kinds is None:
        return x, [""] * len(x)
    kinds = np.atleast_1d(kinds)
    if kinds.dtype.kind not in "US" or kinds.shape != (len(x),):
        raise DataError(f"array 'kind' in {path} must be {len(x)} strings, one per row of 'x'; got {kinds.dtype} {list(kinds.shape)}")
    return x, [str(k) for k in kinds]


def gather_inputs(files: list[str], input_shape: tuple[int, ...]) -> Inputs:
    """Read every file into one float32 batch for a model taking `input_shape` (without the batch axis)."""
    arrays, sources, kinds = [], [], []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"no such file: {name}")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if len(input_shape) != 3 or input_shape[0] not in (1, 3):
                raise DataError(f"{name} is an image, but the model takes inputs of shape {list(input_shape)}; give .npy or .npz arrays")
            array = decode_image(path, channels=input_shape[0], size=input_shape[1:])[None]
            row_kinds = [""]
        elif suffix == ".npy":
            array = _read_array(path, _load_npy(path), input_shape, "the array")
            row_kinds = [""] * len(array)
        elif suffix == ".npz":
            array, row_kinds = _load_npz(path, input_shape)
        else:
            raise DataError(f"cannot read {name}: expected an image ({', '.join(IMAGE_SUFFIXES)}), a .npy or a .npz file")
        arrays.append(np.asarray(array, dtype=np.float32))
        sources += [name] if len(array) == 1 and suffix != ".npz" else [f"{name}[{i}]" for i in range(len(array))]
        kinds += row_kinds
    return Inputs(np.concatenate(arrays), sources, kinds)


def prediction_rows(predictor: Predictor, inputs: Inputs) -> list[dict]:
    """One JSON-ready dict per input: source, kind, label, class_index, confidence, ood_score, is_ood,
    and for an OOD decision `ood_driver`, the part of the score that drove it (ncguard.runtime)."""
    result = predictor.predict(inputs.x)
    classes = predictor.metadata.classes
    rows = []
    for i, source in enumerate(inputs.sources):
        row = {"input": source}
        if inputs.kinds[i]:
            row["kind"] = inputs.kinds[i]
        row.update(
            label=classes[int(result.class_index[i])],
            class_index=int(result.class_index[i]),
            confidence=float(result.confidence[i]),
            ood_score=float(result.ood_score[i]),
            is_ood=bool(result.is_ood[i]),
            ood_driver=predictor.component_names[int(result.driver[i])] if result.is_ood[i] else None,
        )
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    show_kind = any("kind" in row for row in rows)
    header = ["input", *(["kind"] if show_kind else []), "label", "confidence", "ood_score", "decision"]
    table = [header]
    for row in rows:
        decision = f"OOD ({row['ood_driver']})" if row["is_ood"] else "in-distribution"
        cells = [row["input"], *([row.get("kind", "")] if show_kind else [])]
        table.append([*cells, row["label"], f"{row['confidence']:.3f}", f"{row['ood_score']:.5g}", decision])
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported .onnx model")
    p.add_argument("files", nargs="+", help="PNG/JPEG images, .npy (one input or a batch) or .npz (array x, optional kind)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES, help="ONNX Runtime execution provider")
    p.add_argument("--verify-key", default=None, metavar="FILE",
                   help="Ed25519 public key (PREFIX.pub of `ncguard keygen`; default $NCGUARD_VERIFY_KEY): refuse a model it did not sign")


def run(args: argparse.Namespace) -> int:
    predictor = Predictor(args.model, provider=getattr(args, "provider", None), verify_key=verify_key_path(getattr(args, "verify_key", None)))
    meta = predictor.metadata
    inputs = gather_inputs(list(args.files), tuple(meta.input_shape))
    rows = prediction_rows(predictor, inputs)
    if getattr(args, "json", False):
        document = {
            "model": meta.name,
            "score": meta.score,
            "threshold": meta.threshold,
            "providers": list(predictor.providers_),
            "predictions": rows,
        }
        print(json.dumps(document, indent=2))
    else:
        print(
            f"model {meta.name}: score {meta.score}, threshold {meta.threshold:.5g} (keeps {meta.tpr:.0%} of ID inputs); "
            f"ONNX Runtime provider {predictor.providers_[0]}",
            file=sys.stderr,
        )
        print(format_table(rows))
    return 0
