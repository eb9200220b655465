"""`ncguard fit EXISTING.onnx --features NAME[,NAME...] --data SPEC --out MODEL.onnx`: bring your own model.

Adds the OOD score, the threshold and the drift reference to a classifier you already have, without
retraining, and writes a model with the same contract as `ncguard export`, so `ncguard serve`,
`predict`, `evaluate` and the monitoring work unchanged. Torch-free; the work is in export.byom.

Input scaling: the data readers give float32 inputs with pixels in [0, 1] (IDX bytes / 255,
digits / 16; a .npz is taken as given), and the served model takes the same. If your model
expects something else, say how to get there from [0, 1]; the graph then does it:
    model input = (--input-scale * x - --input-mean) / --input-std, cast to the model's input dtype
e.g. `--input-scale 255` for a model trained on raw 0-255 pixels (uint8 inputs are rounded and
clipped), or `--input-mean 0.485,0.456,0.406 --input-std 0.229,0.224,0.225` for ImageNet-style
normalization done outside the model.

Several --features tensors (early blocks first, the penultimate layer last) give a multi-layer
score, `fused` by default (ncguard.scores.defaults): feature maps are read through their per-channel
mean and std, as ncguard's own models give their blocks to it by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..calibration import DEFAULT_TPR
from ..data import load_dataset
from ..errors import ConfigError
from ..model_file import load_model, save_model, sign_model
from ..signing import fingerprint, load_private_key
from ..runtime import PROVIDER_CHOICES, check_provider
from ..scores import SCORE_NAMES
from ..scores.defaults import FOREIGN, FOREIGN_MULTI, default_score



def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes a number or comma-separated numbers (one per channel), got {text!r}") from None
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.byom import DEFAULT_BATCH_SIZE, DEFAULT_CALIBRATION_FRACTION

    score = default_score(FOREIGN)

    p.add_argument("model", help="the existing ONNX classifier (nothing of ncguard inside)")
    p.add_argument("--features", required=True, metavar="NAME[,NAME...]",
                   help="tensor or node whose output holds the features, e.g. the penultimate layer; or several, comma-separated, "
                        "early blocks first and the penultimate layer last (feature maps are pooled per channel; default score "
                        f"then {default_score(FOREIGN_MULTI)}). `ncguard inspect` suggests both")
    p.add_argument("--data", required=True, metavar="SPEC", help="labelled in-distribution data, classes in the model's output order")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--logits", default=None, metavar="NAME", help="tensor or node holding the logits (default: the model's logits-like output)")
    p.add_argument("--score", default=None,
                   help=f"OOD score (default {score} for one --features tensor, {default_score(FOREIGN_MULTI)} for several); one of "
                        + ", ".join(SCORE_NAMES))
    p.add_argument("--tpr", type=float, default=DEFAULT_TPR, help="fraction of held-out in-distribution inputs the threshold keeps")
    p.add_argument("--input-scale", type=float, default=1.0, metavar="FACTOR",
                   help="the model takes FACTOR times the readers' [0, 1] pixels (e.g. 255)")
    p.add_argument("--input-mean", default="0", metavar="M[,M...]", help="subtracted after scaling (one value or one per channel)")
    p.add_argument("--input-std", default="1", metavar="S[,S...]", help="divided by after subtracting the mean")
    p.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES, help="ONNX Runtime execution provider")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="inputs per ONNX Runtime call")
    p.add_argument("--calibration-fraction", type=float, default=DEFAULT_CALIBRATION_FRACTION,
                   help="share of the data held out to calibrate the threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration split and the feature bank")
    p.add_argument("--name", default=None, help="model name in the metadata (default: the --out file's name)")
    p.add_argument("--sign-key", default=None, metavar="FILE",
                   help="Ed25519 private key (PREFIX.key of `ncguard keygen`): sign the model, so consumers given the public key can verify it")


def run(args: argparse.Namespace) -> int:
    from export.byom import fit_existing_model
    from export.finish import TRANSFER_LAYER
    from export.graph_reading import load_onnx
    from export.graph_surgery import InputTransform

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out {args.out!r} should end in .onnx")
    check_provider(args.provider)  # before the slow part
    private_key = load_private_key(args.sign_key) if getattr(args, "sign_key", None) else None  # likewise
    transform = InputTransform(args.input_scale, _floats(args.input_mean, "--input-mean"), _floats(args.input_std, "--input-std"))
    source = load_onnx(args.model)
    data = load_dataset(args.data)
    proto, report = fit_existing_model(
        source,
        data,
        features=args.features,
        logits=args.logits,
        score=args.score,
        tpr=args.tpr,
        transform=transform,
        provider=args.provider,
        batch_size=args.batch_size,
        calibration_fraction=args.calibration_fraction,
        seed=args.seed,
        name=args.name or out.stem,
        source_label=Path(args.model).name,
    )
    if private_key is not None:
        proto = sign_model(proto, private_key)
    path = save_model(proto, out)
    # what every consumer will do: refuse to report success on a file that does not load (or verify)
    load_model(path, verify_key=private_key.public_key() if private_key is not None else None)
    if private_key is not None:
        print(f"signed with key {fingerprint(private_key)}")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {path}: {report.n_classes} classes, {report.width} features from {report.layers[TRANSFER_LAYER]['tensor']!r}")
    for layer, info in report.layers.items():
        if len(report.layers) > 1 or info["pooled"]:
            how = "per-channel mean and std of the feature map" if info["pooled"] else "flattened"
            print(f"  layer {layer}: {info['tensor']!r}, {info['width']} features ({how})")
    print(f"fitted on {report.n_fit} inputs of {data.name} (model accuracy on them {report.fit_accuracy:.2%}); "
          f"threshold {report.threshold:.6g} keeps {args.tpr:.0%} of {report.n_calibration} held-out inputs")
    print(f"score {report.score} on {'layer ' + report.layer.replace('+', ', ') if report.layer else 'the logits'}; "
          f"classifier {'recovered (vim, nci available)' if report.classifier_recovered else 'not affine in the features'}; "
          f"checked on ONNX Runtime provider {report.providers[0]}")
    for line in report.describe():
        print(f"  parity: {line}")
    return 0
