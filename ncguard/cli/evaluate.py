"""`ncguard evaluate MODEL.onnx --id SPEC --ood SPEC [...]`: how well the exported model flags OOD inputs.

Prints AUROC, FPR at the model's target TPR (FPR95 by default), AUPR-in/out and the fraction of
each OOD set the deployed threshold flags, plus ID accuracy and how well the model's confidence is
calibrated on the ID set: expected calibration error (ECE, 15 bins; Guo et al. 2017) of the raw
softmax(logits) and of the model's temperature-scaled `probabilities`; writes the same as JSON and
two PNGs (score histograms ID vs each OOD set, ROC curves) to --out-dir.

Scoring an exported model is torch-free (ONNX Runtime through `ncguard.runtime.Predictor`).
`--all-scores RUN_DIR` also scores the same inputs with every score of `ncguard.scores`, using the
run's torch model for the features (`training.runs.load_run`), for comparison.
OOD SPECs may be synthetic (`noise:uniform`, `noise:gaussian`, `inverted:SPEC`; see
`ncguard.ood_data`); images of another shape are converted to the model's input shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_write
from ..calibration import ECE_BINS, expected_calibration_error
from ..data import Dataset, iter_batches, load_dataset
from ..errors import DataError
from ..ood_data import fit_to_shape, load_ood_dataset
from ..ood_metrics import ood_report
from ..plots import plot_roc_curves, plot_score_histograms
from ..runtime import PROVIDER_CHOICES, Predictor
from ..signing import verify_key_path
from ..temperature import softmax

DEFAULT_BATCH_SIZE = 256
REPORT_FILE = "evaluation.json"
HISTOGRAM_FILE = "score_histograms.png"
ROC_FILE = "roc_curves.png"


def default_out_dir(model_path: str | os.PathLike) -> Path:
    """MODEL.onnx -> MODEL-evaluation/ next to it."""
    path = Path(model_path)
    return path.with_name(path.stem + "-evaluation")


def score_inputs(predictor: Predictor, x: np.ndarray, name: str, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(ood_score [N], predicted class [N]) over x in batches, with a progress bar."""
    scores, labels = [], []
    batches = iter_batches(len(x), batch_size)
    for rows in tqdm(batches, total=math.ceil(len(x) / batch_size), desc=f"scoring {name}", unit="batch", leave=False, disable=None):  # no bar off a terminal
        result = predictor.predict(x[rows], batch_size=batch_size)
        scores.append(result.ood_score)
        labels.append(result.class_index)
    return np.concatenate(scores).astype(np.float64), np.concatenate(labels)


def id_outputs(predictor: Predictor, x: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE):
    """(ood_score, predicted class, logits, probabilities) over the ID inputs, in batches."""
    parts = []
    batches = iter_batches(len(x), batch_size)
    for rows in tqdm(batches, total=math.ceil(len(x) / batch_size), desc="scoring ID", unit="batch", leave=False, disable=None):
        result = predictor.predict(x[rows], batch_size=batch_size)
        parts.append((result.ood_score, result.class_index, result.logits, result.probabilities))
    scores, predicted, logits, probabilities = (np.concatenate(column) for column in zip(*parts))
    return scores.astype(np.float64), predicted, logits.astype(np.float64), probabilities.astype(np.float64)


def confidence_calibration(labels: np.ndarray, logits: np.ndarray, probabilities: np.ndarray, temperature: float) -> dict:
    """ECE (15 bins) and mean confidence of the raw softmax(logits) and of the model's probabilities."""

    def row(probs: np.ndarray) -> dict:
        return {"ece": expected_calibration_error(probs, labels, ECE_BINS), "mean_confidence": float(probs.max(axis=1).mean())}

    return {"n_bins": ECE_BINS, "temperature": float(temperature), "softmax": row(softmax(logits)), "probabilities": row(probabilities)}


def calibration_table(calibration: dict, accuracy: float) -> str:
    """The two rows of `confidence_calibration` as an aligned text table."""
    rows = [["confidence", "temperature", f"ECE ({calibration['n_bins']} bins)", "mean confidence", "accuracy"]]
    for name, temperature in (("softmax", 1.0), ("probabilities", calibration["temperature"])):
        values = calibration[name]
        rows.append([name, f"{temperature:.4g}", f"{values['ece']:.4f}", f"{values['mean_confidence']:.4f}", f"{accuracy:.2%}"])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))) for r in rows)


def id_accuracy(data: Dataset, classes: list[str], predicted: np.ndarray) -> float | None:
    """Accuracy on the ID set, or None when its class names are not the model's (labels would not line up)."""
    if list(data.classes) != list(classes):
        return None
    return float(np.mean(predicted == data.y))


def load_sets(id_spec: str, ood_specs: list[str], input_shape: tuple[int, ...], seed: int = 0) -> tuple[Dataset, dict[str, np.ndarray]]:
    """The ID set and every OOD set's inputs, each in the model's input shape."""
    id_data = load_dataset(id_spec)
    id_data = Dataset(fit_to_shape(id_data.x, input_shape, f"ID set {id_spec}"), id_data.y, id_data.classes, id_data.name, id_data.input_scale)
    ood_inputs = {}
    for spec in ood_specs:
        if spec in ood_inputs:
            raise DataError(f"OOD set {spec} is given twice")
        ood_inputs[spec] = fit_to_shape(load_ood_dataset(spec, id_data, seed).x, input_shape, f"OOD set {spec}")
    return id_data, ood_inputs


def metrics_table(rows: dict[str, dict], tpr: float = 0.95, first_column: str = "OOD set") -> str:
    """Aligned text table: one row per OOD set (or score / set pair)."""
    header = [first_column, "AUROC", f"FPR{100 * tpr:g}", "AUPR-in", "AUPR-out", "flagged"]
    table = [header]
    for name, report in rows.items():
        flagged = report.get("flagged")
        table.append(
            [
                name,
                f"{report['auroc']:.4f}",
                f"{report['fpr95']:.4f}",
                f"{report['aupr_in']:.4f}",
                f"{report['aupr_out']:.4f}",
                "-" if flagged is None else f"{flagged:.1%}",
            ]
        )
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))) for r in table)


def evaluate_model(
    predictor: Predictor, id_data: Dataset, ood_inputs: dict[str, np.ndarray], batch_size: int
) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    """(JSON-ready ID and per-OOD-set metrics, ID scores, OOD scores per set) from the exported graph."""
    meta = predictor.metadata
    id_scores, id_predicted, id_logits, id_probabilities = id_outputs(predictor, id_data.x, batch_size)
    ood_scores = {name: score_inputs(predictor, x, name, batch_size)[0] for name, x in ood_inputs.items()}
    accuracy = id_accuracy(id_data, meta.classes, id_predicted)
    calibration = None if accuracy is None else confidence_calibration(id_data.y, id_logits, id_probabilities, meta.temperature)
    reports = {}
    for name, scores in ood_scores.items():
        report = ood_report(id_scores, scores, meta.tpr)
        report["flagged"] = float(np.mean(scores > meta.threshold))
        reports[name] = report
    return {
        "id": {
            "spec": id_data.name,
            "n": len(id_data),
            "accuracy": accuracy,
            "flagged": float(np.mean(id_scores > meta.threshold)),
            "calibration": calibration,
        },
        "ood": reports,
    }, id_scores, ood_scores


def evaluate_all_scores(run_dir: str, id_data: Dataset, ood_inputs: dict[str, np.ndarray], tpr: float) -> dict:
    """{"scores": {score: {OOD set: metrics}}, "skipped": {score: reason}} for every score of ncguard.scores."""
    from export.all_scores import score_every_detector  # torch: only on this path

    id_scores, ood_scores, skipped = score_every_detector(run_dir, id_data.x, ood_inputs)
    reports = {name: {ood: ood_report(id_scores[name], ood_scores[name][ood], tpr) for ood in ood_inputs} for name in id_scores}
    return {"run_dir": str(run_dir), "scores": reports, "skipped": skipped}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported .onnx model")
    p.add_argument("--id", required=True, help="in-distribution data SPEC")
    p.add_argument("--ood", required=True, action="append",
                   help="out-of-distribution data SPEC (repeatable); also noise:uniform, noise:gaussian, inverted:SPEC")
    p.add_argument("--out-dir", default=None, help="where the JSON report and PNGs go (default: MODEL-evaluation/ beside the model)")
    p.add_argument("--all-scores", metavar="RUN_DIR", default=None, help="also evaluate every score on the run's features (needs torch)")
    p.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES, help="ONNX Runtime execution provider")
    p.add_argument("--verify-key", default=None, metavar="FILE",
                   help="Ed25519 public key (PREFIX.pub of `ncguard keygen`; default $NCGUARD_VERIFY_KEY): refuse a model it did not sign")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="inputs per ONNX Runtime call")


def run(args: argparse.Namespace) -> int:
    predictor = Predictor(args.model, provider=getattr(args, "provider", None), verify_key=verify_key_path(getattr(args, "verify_key", None)))
    meta = predictor.metadata
    batch_size = int(getattr(args, "batch_size", None) or DEFAULT_BATCH_SIZE)
    id_data, ood_inputs = load_sets(args.id, list(args.ood), tuple(meta.input_shape))
    result, id_scores, ood_scores = evaluate_model(predictor, id_data, ood_inputs, batch_size)

    out_dir = Path(getattr(args, "out_dir", None) or default_out_dir(args.model))
    plots = [
        plot_score_histograms(id_scores, ood_scores, meta.threshold, out_dir / HISTOGRAM_FILE),
        plot_roc_curves(id_scores, ood_scores, out_dir / ROC_FILE),
    ]
    document = {
        "model": {"file": str(args.model), "name": meta.name, "score": meta.score, "threshold": meta.threshold, "tpr": meta.tpr},
        "providers": list(predictor.providers_),
        **result,
        "plots": [str(p) for p in plots],
    }
    all_scores_dir = getattr(args, "all_scores", None)
    if all_scores_dir:
        document["all_scores"] = evaluate_all_scores(all_scores_dir, id_data, ood_inputs, meta.tpr)
    atomic_write(out_dir / REPORT_FILE, json.dumps(document, indent=2) + "\n")

    accuracy = result["id"]["accuracy"]
    accuracy_text = "n/a (its classes are not the model's)" if accuracy is None else f"{accuracy:.2%}"
    print(f"model {meta.name}: score {meta.score}, threshold {meta.threshold:.5g} (target TPR {meta.tpr:.0%}); provider {predictor.providers_[0]}")
    print(f"ID {id_data.name}: {len(id_data)} inputs, accuracy {accuracy_text}, flagged {result['id']['flagged']:.1%}")
    if result["id"]["calibration"] is not None:
        print(f"confidence calibration on {id_data.name}:")
        print(calibration_table(result["id"]["calibration"], accuracy))
    print(metrics_table(result["ood"], meta.tpr))
    if all_scores_dir:
        print(f"\nevery score on the run's features ({all_scores_dir}):")
        every = document["all_scores"]
        rows = {f"{score} / {ood}": report for score, per_set in every["scores"].items() for ood, report in per_set.items()}
        print(metrics_table(rows, meta.tpr, "score / OOD set"))
        for score, reason in every["skipped"].items():
            print(f"  {score}: skipped ({reason})")
    print(f"\nwrote {out_dir / REPORT_FILE}, {plots[0]}, {plots[1]}")
    return 0
