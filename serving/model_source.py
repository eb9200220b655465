"""Where the service finds its model: an exported file, or BentoML's model store (for Bentos).

The store holds the very same `.onnx` file (copied, not converted), so both routes end in
`ncguard.model_file.load_model`, which verifies the checksum and metadata before anything runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ncguard.errors import ModelError, NcguardError
from ncguard.model_file import load_model

from .settings import DEFAULT_MODEL_TAG, MODEL_ENV, MODEL_TAG_ENV, ServeSettings

MODEL_FILE_NAME = "model.onnx"


def store_name(tag: str) -> str:
    return tag.split(":", 1)[0]


def resolve_model_path(settings: ServeSettings) -> Path:
    """The model file named by NCGUARD_MODEL, else the file in the store under NCGUARD_MODEL_TAG."""
    if settings.model_path:
        return Path(settings.model_path)
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        stored = bentoml.models.get(settings.model_tag)
    except NotFound:
        raise ModelError(
            f"no model to serve: set {MODEL_ENV} to an exported .onnx file, or import one into BentoML's "
            f"model store as {settings.model_tag!r} (python -m serving.model_source MODEL.onnx) and set "
            f"{MODEL_TAG_ENV} if you used another tag"
        ) from None
    return Path(stored.path_of(MODEL_FILE_NAME))


def import_to_store(model_path: str | Path, tag: str = DEFAULT_MODEL_TAG) -> str:
    """Copy a verified model file into BentoML's model store; returns the full tag it got."""
    import shutil

    import bentoml

    loaded = load_model(model_path)  # refuse foreign or tampered files before storing them
    meta = loaded.metadata
    with bentoml.models.create(
        store_name(tag),
        labels={"framework": "onnx", "ncguard_score": meta.score},
        metadata={"ncguard_name": meta.name, "ncguard_version": meta.version, "threshold": meta.threshold},
    ) as stored:
        shutil.copyfile(model_path, stored.path_of(MODEL_FILE_NAME))
    return str(stored.tag)


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.model_source MODEL.onnx [--tag NAME]`: the step before `bentoml build`."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.model_source",
        description="Import an exported ncguard model into BentoML's model store (so `bentoml build` can pack it).",
    )
    parser.add_argument("model", help="exported .onnx model")
    parser.add_argument("--tag", default=DEFAULT_MODEL_TAG, help=f"store name (default {store_name(DEFAULT_MODEL_TAG)!r})")
    args = parser.parse_args(argv)
    try:
        tag = import_to_store(args.model, store_name(args.tag))
    except NcguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
