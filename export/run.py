"""Exporting a run directory: `export_run(RUN_DIR, OUT)`, what `ncguard export` does.

Reads the run (model, config, statistics) with `training.runs.load_run`, takes the run's own score
and TPR unless told otherwise (`run_score_and_tpr`), builds the detector (`ncguard.scores.build_detector`,
every option checked against the run's statistics before the data pass), rebuilds the held-out ID
calibration split exactly as training drew it (the data SPEC, fraction and seed in config.json),
exports and checks the graph (export.torch_export), and writes one .onnx file, signed if asked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ncguard.calibration import check_open_unit
from ncguard.errors import ModelError
from ncguard.model_file import load_model, save_model, sign_model
from ncguard.runtime import check_provider
from ncguard.scores import build_detector
from ncguard.scores.defaults import default_score
from ncguard.signing import load_private_key
from training.runs import calibration_inputs, load_run

from .torch_export import export_model


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
