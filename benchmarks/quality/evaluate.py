"""Evaluation stage: every score on every trained model, per OOD set, plus accuracy and the transfer probes.

For one run: the layer features of the ID test set, the run's own held-out calibration split, the far
OOD sets, the covariate-shifted sets (and, for near-OOD models, the unseen classes) come from the
run's torch model in one pass each. Detectors are fitted from the run's statistics exactly as
`ncguard export` fits them (ncguard.scores.build_detector, then Detector.fit) and scored with the NumPy reference; the
multi-layer candidates use ncguard.scores.fused, standardized on the calibration split (ID only).
The result is one JSON per run, so the report can be rebuilt without recomputing.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ncguard.atomic import atomic_write
from ncguard.data import load_dataset
from ncguard.errors import NcguardError
from ncguard.ood_metrics import ood_report
from ncguard.scores import SCORES, build_detector

from .ood_sets import NEAR_OOD, far_ood_sets, shifted_sets
from .probe import transfer_probes
from .select import combination_metrics
from .plan import Budget, ModelSpec, known_classes

LAYERS = ("block1", "block2", "block3", "transfer", "detection", "logits")
BLOCKS = ("block1", "block2", "block3")
MAX_CALIBRATION = 5000
# Multi-layer candidates: (row name, components, combine). The benchmark picks the default among them;
# "fused" (components and combine None) is the shipped default, ncguard.scores.fused.default_fused.
BLOCK_MAHALANOBIS = tuple((b, "mahalanobis") for b in BLOCKS)
FUSED_CANDIDATES = (
    ("fused-blocks+etf", (*BLOCK_MAHALANOBIS, ("detection", "etf")), "sum"),
    ("fused-blocks+etf-max", (*BLOCK_MAHALANOBIS, ("detection", "etf")), "max"),
    ("fused-block1+etf", (("block1", "mahalanobis"), ("detection", "etf")), "sum"),
    ("fused-blocks+ddu", (*BLOCK_MAHALANOBIS, ("detection", "ddu")), "sum"),
    ("fused-blocks+ddu+vim", (*BLOCK_MAHALANOBIS, ("detection", "ddu"), ("detection", "vim")), "sum"),
    ("fused", None, None),  # the default of ncguard train/export: components and combine from ncguard.scores.fused.default_fused
    # Near-OOD round 2 (issue 16): block1's pixel statistics drowned the semantic signal on split c, so
    # the default ("fused" above) became block3 + DDU; round 1's default and a second semantic component beside it
    ("fused-block1+block3+ddu", (("block1", "mahalanobis"), ("block3", "mahalanobis"), ("detection", "ddu")), "sum"),
    ("fused-block3+ddu+knn", (("block3", "mahalanobis"), ("detection", "ddu"), ("detection", "knn")), "sum"),
    # Round 3: the default's DDU became low-rank (ddu-lowrank); round 2's full-covariance default beside it
    ("fused-block3+ddu", (("block3", "mahalanobis"), ("detection", "ddu")), "sum"),
    ("fused-blocks+vim", (*BLOCK_MAHALANOBIS, ("detection", "vim")), "sum"),
    ("fused-blocks+mahalanobis", (*BLOCK_MAHALANOBIS, ("detection", "mahalanobis")), "sum"),
    ("fused-blocks", BLOCK_MAHALANOBIS, "sum"),
    # Round 7: the default's block part scored given the head's features (runs trained since it exists;
    # older runs skip it, their statistics hold no joint statistic)
    ("fused-conditional", (("block3", "conditional-mahalanobis"), ("detection", "ddu-lowrank")), "sum"),
    # Round 8: the default adds those two parts as one density (combine "joint") when the run streams the joint
    # statistic and trained on enough images; the default of rounds 3-7 (the same parts unconditioned, summed) beside it
    ("fused-block3+ddu-lowrank", (("block3", "mahalanobis"), ("detection", "ddu-lowrank")), "sum"),
)
CALIBRATION = "cal"  # the key of the run's held-out split in the feature cache
# Feature scores that need no classifier, so they read any layer; the others (vim, nci, neco and the
# logit scores) read the layer the classifier acts on.
ANY_LAYER_SCORES = ("mahalanobis", "ddu", "ddu-lowrank", "knn", "etf")


def layer_features(model, x: np.ndarray, desc: str) -> dict[str, np.ndarray]:
    from training.inference import collect_layer_features

    return collect_layer_features(model, x, LAYERS, desc=desc)


def evaluation_inputs(spec: ModelSpec, budget: Budget) -> tuple[tuple[np.ndarray, np.ndarray], dict, dict]:
    """((ID test x, y), {OOD set: x}, {shift: (x, y)}) for a model's task.

    A near-OOD model (6 known classes of a split) meets its split's 4 unseen classes
    ("fmnist-held-out"), the far sets, and the covariate shifts of its known classes' test images
    (labels renumbered as in training), so one run checks near and far OOD on the same model.
    """
    test = load_dataset("fashion-mnist:test")
    rows = np.random.default_rng(1).permutation(len(test.y))
    far = far_ood_sets(test, budget.ood_per_set)
    if spec.task == "near":
        known_list = known_classes(spec.task, spec.split)
        known = np.isin(test.y[rows], known_list)
        unseen = rows[~known][: budget.ood_per_set]
        rows = rows[known]
        remap = np.full(10, -1)
        remap[list(known_list)] = np.arange(len(known_list))
        id_rows = rows[: budget.id_test] if budget.id_test else rows
        known_test = test.subset(rows)
        known_test = replace(known_test, y=remap[known_test.y])
        shifts = shifted_sets(known_test, budget.ood_per_set)
        return (test.x[id_rows], remap[test.y[id_rows]]), {NEAR_OOD[0]: test.x[unseen], **far}, shifts
    id_rows = rows[: budget.id_test] if budget.id_test else rows
    shifts = shifted_sets(test, budget.ood_per_set)
    return (test.x[id_rows], test.y[id_rows]), far, shifts


def read_feature_cache(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{set: {layer: features}} from a cache `cached_features` wrote (keys "set|layer")."""
    with np.load(path, allow_pickle=False) as stored:
        features: dict[str, dict[str, np.ndarray]] = {}
        for key in stored.files:
            set_name, layer = key.split("|")
            features.setdefault(set_name, {})[layer] = stored[key]
    return features


def cached_features(model, config: dict, inputs: dict[str, np.ndarray | None], path: Path, name: str) -> dict[str, dict[str, np.ndarray]]:
    """{set: {layer: features}}, read from `path` when an earlier evaluation saved them (keys "set|layer").

    Re-scoring (new candidates, a new report) then costs seconds instead of a forward pass per set.
    A `None` input is the run's calibration split, loaded only when it is not cached.
    """
    if path.exists():
        features = read_feature_cache(path)
        if set(features) == set(inputs):
            return features
    features = {}
    for set_name, x in inputs.items():
        x = calibration_inputs(config) if x is None else x
        features[set_name] = layer_features(model, x, f"{name}: {set_name}")
    flat = {f"{set_name}|{layer}": value for set_name, by_layer in features.items() for layer, value in by_layer.items()}
    atomic_write(path, lambda stream: np.savez(stream, **flat))
    return features


def calibration_inputs(config: dict) -> np.ndarray:
    """The run's held-out ID split (training data it never fitted on), at most MAX_CALIBRATION rows."""
    from training.runs import calibration_inputs as held_out_inputs

    return held_out_inputs(config)[0][:MAX_CALIBRATION]


def calibration_error(config: dict, held_out_logits: np.ndarray, test_logits: np.ndarray, test_y: np.ndarray) -> dict:
    """Expected calibration error (15 bins) of the test split's confidence before and after the
    softmax temperature that export fits on the run's held-out split (the same rows as
    `calibration_inputs`, with their labels; ncguard.temperature, Guo et al. 2017)."""
    from ncguard.calibration import expected_calibration_error
    from ncguard.temperature import fit_temperature, softmax
    from training.runs import calibration_inputs as held_out_inputs

    held_out_y = held_out_inputs(config, with_labels=True)[1][: len(held_out_logits)]
    temperature = fit_temperature(held_out_logits.astype(np.float64), held_out_y)
    test_logits = test_logits.astype(np.float64)
    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(softmax(test_logits), test_y),
        "ece_after": expected_calibration_error(softmax(test_logits, temperature), test_y),
    }


def _scorers(bundle, calibration: dict[str, np.ndarray]):
    """{row name: function(features by layer) -> scores}; rows that cannot be fitted are skipped with why."""
    scorers, skipped = {}, {}
    for name in sorted(SCORES):
        try:
            scorers[name] = build_detector(name, bundle).fit(bundle).score
        except NcguardError as exc:
            skipped[name] = str(exc)
    # every score that reads features alone on every other layer ("every score on every layer")
    for layer in (*BLOCKS, "transfer"):
        if layer not in bundle.layers:
            continue
        for name in ANY_LAYER_SCORES:
            try:
                scorers[f"{name}@{layer}"] = build_detector(name, bundle, layer=layer).fit(bundle).score
            except NcguardError as exc:
                skipped[f"{name}@{layer}"] = str(exc)
    for name, components, combine in FUSED_CANDIDATES:
        try:
            scorers[name] = _fused(bundle, calibration, components, combine)
        except (NcguardError, KeyError) as exc:
            skipped[name] = str(exc)
    return scorers, skipped


def _fused(bundle, calibration, components, combine):
    """A fused candidate through the one detector contract (build_detector), standardized on the held-out split."""
    detector = build_detector("fused", bundle, components=components, combine=combine).fit(bundle, calibration)
    return detector.score


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def model_record(spec: ModelSpec, config: dict) -> dict:
    """What every result file says about the model it describes (evaluation and proxy selection alike)."""
    return {
        "model": spec.name,
        "group": spec.group,
        "head": spec.head,
        "seed": spec.seed,
        "task": spec.task,
        "split": spec.split,
        "role": spec.role,
        "settings": config["settings"],
    }


def evaluate_run(spec: ModelSpec, run_dir: Path, budget: Budget) -> dict:
    import torch

    from training.runs import load_run

    torch.set_num_threads(2)
    started = time.perf_counter()
    model, config, bundle = load_run(run_dir)
    (id_x, id_y), ood, shifts = evaluation_inputs(spec, budget)
    inputs = {"id": id_x, CALIBRATION: None, **ood, **{k: v[0] for k, v in shifts.items()}}
    features = cached_features(model, config, inputs, run_dir.parent.parent / "features" / f"{spec.name}.npz", spec.name)
    calibration = features.pop(CALIBRATION)
    scorers, skipped = _scorers(bundle, calibration)
    scores = {row: {key: np.asarray(score(f)) for key, f in features.items()} for row, score in tqdm(scorers.items(), desc=f"{spec.name}: scores", leave=False, disable=None)}
    metrics = {row: {key: ood_report(by_set["id"], values) for key, values in by_set.items() if key != "id"} for row, by_set in scores.items()}
    # the transfer probes (benchmarks/quality/probe.py): the full probe on digits, and the few-shot probe
    # on digits and glyph letters, which has the headroom the saturated full probe lacks
    probe, few_shot = transfer_probes(model, budget.probe_folds) if spec.task == "full" else (None, None)
    result = {
        **model_record(spec, config),
        "id_accuracy": _accuracy(features["id"]["logits"], id_y),
        "n_id": int(len(id_y)),
        "shift_accuracy": {k: _accuracy(features[k]["logits"], y) for k, (_, y) in shifts.items()},
        "calibration_error": calibration_error(config, calibration["logits"], features["id"]["logits"], id_y),
        "metrics": metrics,
        "combinations": combination_metrics(bundle, calibration, features) if spec.task == "near" else None,
        "skipped_scores": skipped,
        "probe": probe,
        "few_shot_probe": few_shot,
        "training": _training_record(run_dir),
        "seconds": time.perf_counter() - started,
    }
    return result


def _training_record(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    timing_file = run_dir / "benchmark-timing.json"
    history = metrics.get("history", [])
    return {
        "test_accuracy": (metrics.get("test") or {}).get("accuracy"),
        "epochs": len(history),
        "epoch_seconds": [h["seconds"] for h in history],
        "val_accuracy": [h["val_accuracy"] for h in history],
        "nc1": metrics.get("nc1_history"),
        "train_seconds": metrics.get("timings", {}).get("train_seconds"),
        "wall_seconds": json.loads(timing_file.read_text())["wall_seconds"] if timing_file.exists() else None,
    }


def write_result(result: dict, path: Path) -> None:
    atomic_write(path, json.dumps(result, indent=1, sort_keys=True))
