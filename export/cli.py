"""`ncguard export RUN_DIR --out MODEL.onnx [--score NAME] [--tpr 0.95] [--provider P] [--bentoml [NAME]]`: flags and handler.

`--score fused` embeds the multi-layer score (ncguard.scores.fused) with `--components
block1:mahalanobis,detection:etf` and `--combine sum|max|joint` (default: `ncguard.scores.fused.default_fused`
of the run's statistics). Without --score and --tpr the run's own are used.

The work is `export.run.export_run`; with --bentoml the written file is also copied into BentoML's
model store the way the service loads it (serving.model_source).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.run import export_run
from ncguard.errors import ConfigError
from ncguard.runtime import PROVIDER_CHOICES
from ncguard.scores import SCORE_NAMES
from ncguard.scores.fused import COMBINES
from ncguard.signing import fingerprint, load_private_key
from training.runs import calibration_inputs  # noqa: F401  (benchmarks/quality still imports it from here)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `ncguard train`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--score", default=None, help="OOD score to embed (default: the run's score); one of " + ", ".join(SCORE_NAMES))
    p.add_argument("--tpr", type=float, default=None, help="fraction of held-out in-distribution inputs the threshold keeps (default: the run's `ncguard train --tpr`)")
    p.add_argument("--layer", default=None, help="statistics layer the score reads (default: detection)")
    p.add_argument("--components", default=None, metavar="LAYER:SCORE,...",
                   help="with --score fused: the components, e.g. block1:mahalanobis,detection:etf "
                        "(default: the last conv block given the detection and transfer layers, block3:conditional-mahalanobis, "
                        "plus detection:ddu-lowrank, combined 'joint', for runs trained on enough images to stream their joint "
                        "statistic; otherwise mahalanobis on the last conv block plus detection:ddu-lowrank, combined 'sum')")
    p.add_argument("--combine", default=None, choices=COMBINES,
                   help="with --score fused: how the standardized components combine: sum, max, or joint (negative log-densities "
                        "added as one density; mahalanobis, conditional-mahalanobis, ddu, ddu-lowrank). Default: the default "
                        "components' own, else sum")
    p.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES, help="ONNX Runtime provider for the parity check")
    p.add_argument("--sign-key", default=None, metavar="FILE",
                   help="Ed25519 private key (PREFIX.key of `ncguard keygen`): sign the model, so consumers given the public key can verify it")
    p.add_argument("--bentoml", nargs="?", const="ncguard-model", default=None, metavar="NAME",
                   help="also save the model into BentoML's model store under NAME (default ncguard-model)")


def run_export(args: argparse.Namespace) -> int:
    """Handler of `ncguard export` (flags: run_dir, --out, --score, --tpr, --layer, --components, --combine, --provider, --bentoml [NAME])."""
    out = getattr(args, "out", None)
    if not out:
        raise ConfigError("--out must name the .onnx file to write")
    if Path(out).suffix.lower() != ".onnx":
        raise ConfigError(f"--out {out!r} should end in .onnx")
    path, report = export_run(
        args.run_dir,
        out,
        score=getattr(args, "score", None),
        tpr=getattr(args, "tpr", None),
        layer=getattr(args, "layer", None),
        provider=getattr(args, "provider", None),
        components=getattr(args, "components", None),
        combine=getattr(args, "combine", None),
        sign_key=getattr(args, "sign_key", None),
    )
    print(f"exported {args.run_dir} -> {path}")
    if getattr(args, "sign_key", None):
        print(f"signed with key {fingerprint(load_private_key(args.sign_key))}")
    print(f"score {report.score} on layer {report.layer or 'logits'}, threshold {report.threshold:.6g}; "
          f"checked on ONNX Runtime provider {report.providers[0]}")
    for line in report.describe():
        print(f"  parity: {line}")
    if report.calibration_error:
        error = report.calibration_error
        print(f"probabilities: temperature {report.temperature:.4g} fitted on {error['inputs']} held-out inputs; "
              f"held-out ECE (15 bins) {error['ece_before']:.4f} -> {error['ece_after']:.4f}")
    bentoml_name = getattr(args, "bentoml", None)
    if bentoml_name:
        from serving.model_source import import_to_store  # the service's own store layout

        tag = import_to_store(path, bentoml_name)
        print(f"saved to BentoML's model store as {tag}")
    return 0
