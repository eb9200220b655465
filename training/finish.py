"""After training: fit the class statistics, measure collapse and test accuracy, and write the run's
files (statistics.npz, collapse.json, metrics.json, model.pt last).

Apart from training/train.py, which turns options into a trained model, because this half changes
when what a run records changes, not when how it is trained does.

No threshold is calibrated here. A threshold belongs to the scores it is compared with: those of the
exported graph (float32, ONNX Runtime), for the score and TPR chosen at export, which may differ from
the run's. `ncguard export` calibrates it on the same held-out split (redrawn from config.json), so a
training-time threshold would be a second number nobody reads that could silently disagree with the
shipped one. The run records only its default score and TPR (`settings`, and the bundle's meta),
which `ncguard export` reads back as its defaults.
"""

from __future__ import annotations

import time

import numpy as np

from ncguard.collapse import NearestMeanAgreement, collapse_report
from ncguard.data import Dataset, load_dataset
from ncguard.run_dir import RunFiles
from ncguard.scores.conditional_mahalanobis import streamed_joint
from ncguard.stats import ClassStatistics, StatisticsBundle, joint_features, joint_name

from .files import atomic_torch_save, atomic_write_json
from .inference import accuracy_and_loss, iter_layer_features

REQUIRED_LAYERS = ("transfer", "detection")  # the layers every run fits and reports NC1-NC4 of
NC4_SAMPLES = 10_000


def finish_run(
    model, history, config, files: RunFiles, fit_data, device, train_seconds, started, replicas=None
) -> dict:
    """After training: statistics, NC report, test accuracy; write the run files."""
    settings, data = config["settings"], config["data"]
    fit_start = time.perf_counter()
    layers = tuple(settings["layers"])
    stats, joint = fit_statistics(model, fit_data, layers, settings, device)
    agreement = nearest_mean_agreement(model, fit_data, stats, settings["seed"], device)
    weight, bias = model.classifier_weight_bias()
    reports = {}
    for layer in REQUIRED_LAYERS:
        classifier_input = layer == "detection" or settings["head"] == "plain"  # plain: z is h
        reports[layer] = collapse_report(stats[layer], weight if classifier_input else None, agreement[layer])

    fit_seconds = time.perf_counter() - fit_start

    test = None
    if data["test_spec"]:
        test_data = load_dataset(data["test_spec"])
        accuracy, loss = accuracy_and_loss(model, test_data.x, test_data.y, device)
        test = {"spec": data["test_spec"], "accuracy": accuracy, "loss": loss, "n": len(test_data)}

    bundle = StatisticsBundle(
        layers=stats, joint=joint, weight=weight, bias=bias, classes=tuple(data["classes"]),
        meta={
            "run_id": config["run_id"],
            "score": settings["score"],
            "tpr": settings["tpr"],
            "classifier_layer": "detection",
            "head": settings["head"],
        },
    )
    checksum = bundle.save(files.statistics)

    nc1_history = {
        layer: [record.get(f"nc1_{layer}") for record in history] for layer in REQUIRED_LAYERS
    }
    if any(value is None for values in nc1_history.values() for value in values):
        nc1_history = None
    atomic_write_json(files.collapse, {"run_id": config["run_id"], "head": settings["head"], "layers": reports})
    metrics = {
        "run_id": config["run_id"],
        "history": history,
        "nc1_history": nc1_history,
        "final": {key: history[-1].get(key) for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")},
        "test": test,
        "statistics_checksum": checksum,
        "distributed": replicas,
        "timings": {
            "train_seconds": train_seconds,
            "fit_seconds": fit_seconds,
            "total_seconds": time.perf_counter() - started,
        },
    }
    atomic_write_json(files.metrics, metrics)
    atomic_torch_save(files.model, model.state_dict())
    return {
        "run_dir": str(files.root),
        "run_id": config["run_id"],
        "test_accuracy": None if test is None else test["accuracy"],
        "val_accuracy": history[-1].get("val_accuracy"),
        "nc1": {layer: reports[layer]["nc1"] for layer in REQUIRED_LAYERS},
        "score": settings["score"],
        "tpr": settings["tpr"],
        "total_seconds": metrics["timings"]["total_seconds"],
    }


def fit_statistics(model, dataset: Dataset, layers, settings, device) -> tuple[dict[str, ClassStatistics], dict[str, ClassStatistics]]:
    """(class statistics of every fitted layer, the joint statistics of `streamed_joint(layers)`),
    streaming over the fit split (one pass). The joint statistic keeps a tied covariance and no bank:
    what `conditional-mahalanobis` reads, the cross-covariances per-layer statistics lack."""
    n_classes = len(dataset.classes)
    stats = {layer: ClassStatistics(n_classes, seed=settings["seed"]) for layer in layers}
    parts = streamed_joint(layers)
    joint = {joint_name(parts): ClassStatistics(n_classes, per_class_covariance=False, bank_size=0)} if parts else {}
    for rows, features in iter_layer_features(model, dataset.x, layers, device=device):
        for layer in layers:
            stats[layer].partial_fit(features[layer], dataset.y[rows])
        for name, value in joint.items():
            value.partial_fit(joint_features(features, name), dataset.y[rows])
    return ({layer: value.finalize() for layer, value in stats.items()}, {name: value.finalize() for name, value in joint.items()})


def nearest_mean_agreement(model, dataset: Dataset, stats, seed: int, device) -> dict[str, NearestMeanAgreement]:
    """NC4 of the transfer and detection layers, on at most NC4_SAMPLES training samples.

    It needs the final class means, so it is a second pass; a seeded subsample keeps that pass
    short on large data sets (a mismatch rate from 10,000 samples has a standard error below 0.005).
    """
    rows = np.arange(len(dataset))
    if len(rows) > NC4_SAMPLES:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), size=NC4_SAMPLES, replace=False))
    agreement = {layer: NearestMeanAgreement(stats[layer].means_) for layer in REQUIRED_LAYERS}
    for _, features in iter_layer_features(model, dataset.x[rows], (*REQUIRED_LAYERS, "logits"), device=device):
        predictions = features["logits"].argmax(axis=1)
        for layer in REQUIRED_LAYERS:
            agreement[layer].partial_fit(features[layer], predictions)
    return {layer: value.finalize() for layer, value in agreement.items()}
