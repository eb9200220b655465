"""`ncguard export RUN_DIR --out MODEL.onnx [--score NAME] [--tpr 0.95] [--provider P] [--bentoml [NAME]]`.

`--score fused` embeds the multi-layer score (ncguard.scores.fused) with `--components
block1:mahalanobis,detection:etf` (default: `ncguard.scores.fused.default_components` of the run's
statistics) and `--combine sum|max`. Without --score and --tpr the run's own are used.

Reads the run (model, config, statistics) with `training.runs.load_run`, rebuilds the held-out ID
calibration split exactly as training drew it (the data SPEC, fraction and seed in config.json),
exports and checks the graph (export.torch_export), writes one .onnx file and, with --bentoml,
copies it into BentoML's model store the way the service loads it (serving.model_source).
"""

from __future__ import annotations

import argparse
from pathlib import Path


from ncguard.calibration import check_open_unit
from ncguard.errors import ConfigError, ModelError
from ncguard.model_file import load_model, save_model, sign_model
from ncguard.runtime import PROVIDER_CHOICES, check_provider
from ncguard.scores import SCORE_NAMES, build_detector
from ncguard.scores.defaults import default_score
from ncguard.scores.fused import COMBINES
from ncguard.signing import fingerprint, load_private_key
from training.runs import calibration_inputs  # noqa: F401  (also imported from here by benchmarks)



def run_score_and_tpr(config: dict, bundle, score: str | None, tpr: float | None) -> tuple[str, float]:
    """(score, TPR) of an export: the given ones, else the run's own (config.json `settings`, then the
    statistics' meta); a run that records no score gets its head's default (ncguard.scores.defaults)."""
    settings = config.get("settings", {})
    score = score or settings.get("score") or bundle.meta.get("score") or default_score(settings.get("head"))
    if tpr is None:
        tpr = settings.get("tpr", bundle.meta.get("tpr"))
        if tpr is None:
            raise ModelError("the run records no TPR (config.json settings.tpr): pass --tpr")
        tpr = check_open_unit(tpr, "the run's tpr")
    return score, tpr


def export_run(run_dir: str, out: str, *, score: str | None = None, tpr: float | None = None, layer: str | None = None,
               provider: str | None = None, name: str | None = None, components: str | None = None,
               combine: str | None = None, sign_key: str | None = None):
    """Export RUN_DIR to `out`, signed with the Ed25519 private key file `sign_key` if given;
    returns (written path, ExportReport)."""
    import torch

    from training.runs import load_run

    from .torch_export import export_model

    if tpr is not None:
        tpr = check_open_unit(tpr, "--tpr")
    check_provider(provider)  # before the slow part: a wrong --provider fails at once
    private_key = load_private_key(sign_key) if sign_key else None  # likewise a wrong --sign-key
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, config, bundle = load_run(run_dir)
    score, tpr = run_score_and_tpr(config, bundle, score, tpr)
    # every option checked against the run's statistics before the data pass
    detector = build_detector(score, bundle, layer=layer, components=components, combine=combine)
    calibration_x, calibration_y, input_scale = calibration_inputs(config, with_labels=True)
    proto, report = export_model(
        model,
        bundle,
        calibration_x,
        detector=detector,
        tpr=tpr,
        provider=provider,
        name=name or Path(run_dir).resolve().name,
        run_id=str(config.get("run_id", "")),
        input_scale=input_scale,
        extra={"head": config.get("settings", {}).get("head"), "data": config.get("data", {}).get("spec")},
        calibration_y=calibration_y,
    )
    if private_key is not None:
        proto = sign_model(proto, private_key)
    path = save_model(proto, out)
    # what every consumer will do: refuse to report success on a file that does not load (or verify)
    load_model(path, verify_key=private_key.public_key() if private_key is not None else None)
    return path, report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `ncguard train`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--score", default=None, help="OOD score to embed (default: the run's score); one of " + ", ".join(SCORE_NAMES))
    p.add_argument("--tpr", type=float, default=None, help="fraction of held-out in-distribution inputs the threshold keeps (default: the run's `ncguard train --tpr`)")
    p.add_argument("--layer", default=None, help="statistics layer the score reads (default: detection)")
    p.add_argument("--components", default=None, metavar="LAYER:SCORE,...",
                   help="with --score fused: the components, e.g. block1:mahalanobis,detection:etf "
                        "(default: mahalanobis on the first and the last conv block, plus detection:ddu)")
    p.add_argument("--combine", default=None, choices=COMBINES, help="with --score fused: how the standardized components combine (default sum)")
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
