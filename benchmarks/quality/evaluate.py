"""Evaluation stage: every score on every trained model, per OOD set, plus accuracy and the transfer probe.

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
from .select import combination_metrics
from .plan import Budget, ModelSpec, known_classes

LAYERS = ("block1", "block2", "block3", "transfer", "detection", "logits")
BLOCKS = ("block1", "block2", "block3")
MAX_CALIBRATION = 5000
# Multi-layer candidates: (row name, components, combine). The benchmark picks the default among them;
# "fused" (components None) is the shipped default, ncguard.scores.fused.default_components.
BLOCK_MAHALANOBIS = tuple((b, "mahalanobis") for b in BLOCKS)
FUSED_CANDIDATES = (
    ("fused-blocks+etf", (*BLOCK_MAHALANOBIS, ("detection", "etf")), "sum"),
    ("fused-blocks+etf-max", (*BLOCK_MAHALANOBIS, ("detection", "etf")), "max"),
    ("fused-block1+etf", (("block1", "mahalanobis"), ("detection", "etf")), "sum"),
    ("fused-blocks+ddu", (*BLOCK_MAHALANOBIS, ("detection", "ddu")), "sum"),
    ("fused-blocks+ddu+vim", (*BLOCK_MAHALANOBIS, ("detection", "ddu"), ("detection", "vim")), "sum"),
    ("fused", None, "sum"),  # the default of ncguard train/export (ncguard.scores.fused.default_components)
    # Near-OOD round 2 (issue 16): block1's pixel statistics drowned the semantic signal on split c, so
    # the last block alone, with one or two semantic components on the detection layer
    ("fused-block1+block3+ddu", (("block1", "mahalanobis"), ("block3", "mahalanobis"), ("detection", "ddu")), "sum"),
    ("fused-block3+ddu", (("block3", "mahalanobis"), ("detection", "ddu")), "sum"),
    ("fused-block3+ddu+knn", (("block3", "mahalanobis"), ("detection", "ddu"), ("detection", "knn")), "sum"),
    ("fused-blocks+vim", (*BLOCK_MAHALANOBIS, ("detection", "vim")), "sum"),
    ("fused-blocks+mahalanobis", (*BLOCK_MAHALANOBIS, ("detection", "mahalanobis")), "sum"),
    ("fused-blocks", BLOCK_MAHALANOBIS, "sum"),
)
CALIBRATION = "cal"  # the key of the run's held-out split in the feature cache
# Feature scores that need no classifier, so they read any layer; the others (vim, nci, neco and the
# logit scores) read the layer the classifier acts on.
ANY_LAYER_SCORES = ("mahalanobis", "ddu", "knn", "etf")


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


def cached_features(model, config: dict, inputs: dict[str, np.ndarray | None], path: Path, name: str) -> dict[str, dict[str, np.ndarray]]:
    """{set: {layer: features}}, read from `path` when an earlier evaluation saved them (keys "set|layer").

    Re-scoring (new candidates, a new report) then costs seconds instead of a forward pass per set.
    A `None` input is the run's calibration split, loaded only when it is not cached.
    """
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            features: dict[str, dict[str, np.ndarray]] = {}
            for key in stored.files:
                set_name, layer = key.split("|")
                features.setdefault(set_name, {})[layer] = stored[key]
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


PROBE_LAYERS = ("transfer", "detection", *BLOCKS)
# Inside the backbone's head (SmallCNN: pool to a grid, Linear, BatchNorm, ReLU -> h): where transfer is lost.
HEAD_PROBES = ("grid", "transfer-preact")


def probe_digits(model, folds: int, seed: int = 0) -> dict[str, float]:
    """Linear-probe accuracy on scikit-learn digits (a task never trained on), per layer.

    Besides the scored layers: "pixels" (the raw input, the floor), "grid" (the pooled block3 grid the
    head's Linear reads) and "transfer-preact" (h before the head's final ReLU), which locate the
    layer where a model's features stop transferring.

    Accuracy is the mean over `folds` stratified folds of all 1,797 digits: one 40% split of
    the 1,347 training digits had a binomial standard error near 0.7 points, as large as the
    differences the study looks for; scoring every digit once brings it near 0.3.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .ood_sets import SIDE
    from ncguard.ood_data import fit_to_shape

    splits = [load_dataset(f"digits:{split}") for split in ("train", "test")]
    x = fit_to_shape(np.concatenate([d.x for d in splits]), (1, SIDE, SIDE), "digits")
    y = np.concatenate([d.y for d in splits])
    features = layer_features(model, x, "features of the probe task")
    features.update(_head_inputs(model, x))
    features["pixels"] = x.reshape(len(x), -1)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    result = {}
    for layer in (*PROBE_LAYERS, *HEAD_PROBES, "pixels"):
        if layer not in features:
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        result[layer] = float(cross_val_score(probe, features[layer], y, cv=splitter).mean())
    return result


def _head_inputs(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """{"grid": input of the head's Linear, "transfer-preact": input of its final ReLU if it has one}; {} for other heads."""
    import torch
    from torch import nn

    head = getattr(model.backbone, "head", None)
    modules = list(head) if isinstance(head, nn.Sequential) else []
    linear = next((m for m in modules if isinstance(m, nn.Linear)), None)
    if linear is None:
        return {}
    captured: dict[str, torch.Tensor] = {}
    hooks = [linear.register_forward_hook(lambda module, inputs, output: captured.__setitem__("grid", inputs[0]))]
    if isinstance(modules[-1], nn.ReLU):  # a pre-hook: the ReLU works in place, so afterwards its input is rectified
        hooks.append(modules[-1].register_forward_pre_hook(lambda module, inputs: captured.__setitem__("transfer-preact", inputs[0].clone())))
    try:
        with torch.no_grad():
            model.eval()
            model(torch.from_numpy(x))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: value.numpy() for name, value in captured.items()}


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
    result = {
        **model_record(spec, config),
        "id_accuracy": _accuracy(features["id"]["logits"], id_y),
        "n_id": int(len(id_y)),
        "shift_accuracy": {k: _accuracy(features[k]["logits"], y) for k, (_, y) in shifts.items()},
        "calibration_error": calibration_error(config, calibration["logits"], features["id"]["logits"], id_y),
        "metrics": metrics,
        "combinations": combination_metrics(bundle, calibration, features) if spec.task == "near" else None,
        "skipped_scores": skipped,
        "probe": probe_digits(model, budget.probe_folds) if spec.task == "full" else None,
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
