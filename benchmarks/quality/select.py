"""ID-only choice of the fused score's components: held-out *known* classes stand in for unseen ones.

Issue 16: round 1's default `fused` score (Mahalanobis on the first and last conv block + DDU on the
detection layer, equal weights) wins far OOD but can lose near OOD, where the block statistics add
pixel noise to a semantic question. Which components, and how much weight the blocks get, must be
chosen without OOD data. The procedure here:

1. Train *proxy* models on 4 of a split's 6 known classes each (plan.PROXY_HELD_OUT names the other 2
   of each proxy; a split's three held-out pairs partition its known classes, so every known class
   stands in for an unseen one exactly once).
2. Fit every candidate component on the proxy's statistics; standardize each on half of the proxy's
   held-out ID split (its own known classes, as `Fused` does); score the other half (ID) and the
   training images of the 2 held-out known classes (the proxy's "unseen" classes). Only the split's
   known classes are ever looked at.
3. Score every combination of the search space (`combinations`: a set of block components from
   BLOCK_SETS, the first and last block or the last block alone, with a weight w in BLOCK_WEIGHTS,
   plus one or two semantic components from SEMANTIC_POOL, summed with weight 1) and pick the one
   with the best mean OBJECTIVE over a split's proxies, or over every split's proxies (`choose`).
   Round 2 added the last-block-alone sets: in round 1, block1's pixel statistics were near chance on
   split c's unseen classes and pulled the sum below the semantic components alone.

Guard (fixed before any result was seen): w >= MIN_BLOCK_WEIGHT. Held-out classes are semantic
look-alikes by construction, so the proxy cannot value the block components, whose job is noise,
photos and covariate shift; those inputs move the block statistics by tens of standard deviations, so
a small weight keeps them caught while adding little noise to near OOD. The unguarded choice (w may
be 0) is reported beside it.

Then the chosen combination is scored on the real split (its 6-class models, unseen classes and far
sets), which the choice never saw.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ncguard.ood_metrics import ood_report
from ncguard.scores import build_detector

BLOCK_COMPONENTS = (("block1", "mahalanobis"), ("block3", "mahalanobis"))  # round 1's default block part
# The block parts a combination may take: {name in the combination's name: components}
BLOCK_SETS = {"blocks": BLOCK_COMPONENTS, "block3": (("block3", "mahalanobis"),)}
SEMANTIC_POOL = (
    ("detection", "ddu"),
    ("detection", "ddu-lowrank"),
    ("detection", "etf"),
    ("detection", "knn"),
    ("detection", "mahalanobis"),
    ("detection", "vim"),
    ("transfer", "ddu"),
    ("transfer", "etf"),
    ("transfer", "knn"),
    ("transfer", "mahalanobis"),
)
BLOCK_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)
MIN_BLOCK_WEIGHT = 0.1
MAX_SEMANTIC = 2
PROXY_OOD = "proxy-held-out"  # the proxy's held-out known classes (training images)
# the default of rounds 3-7 (equal weights, sum); today's (round 8: the block given the head, added to the
# detection part as one density) is outside this search space: benchmarks/results/near/conditional_study.md ranks it
DEFAULT_COMBINATION = "block3*1+detection:ddu-lowrank"
ROUND2_DEFAULT = "block3*1+detection:ddu"  # the default of round 2 (full-covariance DDU)
ROUND1_DEFAULT = "blocks*1+detection:ddu"  # the default until round 2 (block1 and block3)


@dataclass(frozen=True)
class Combination:
    semantic: tuple[tuple[str, str], ...]
    block_weight: float
    blocks: str = "blocks"  # key of BLOCK_SETS

    @property
    def name(self) -> str:
        w = f"{self.block_weight:g}"
        return f"{self.blocks}*{w}+" + "+".join(f"{layer}:{score}" for layer, score in self.semantic)

    @property
    def block_components(self) -> tuple[tuple[str, str], ...]:
        return BLOCK_SETS[self.blocks] if self.block_weight else ()

    @property
    def components(self) -> tuple[tuple[str, str], ...]:
        return (*self.block_components, *self.semantic)


def combinations() -> list[Combination]:
    """The search space; with weight 0 the block sets coincide, so that case is listed once ("blocks*0")."""
    semantic = [c for k in range(1, MAX_SEMANTIC + 1) for c in itertools.combinations(SEMANTIC_POOL, k)]
    return [
        Combination(tuple(sem), w, blocks)
        for blocks in BLOCK_SETS for sem in semantic for w in BLOCK_WEIGHTS if w or blocks == "blocks"
    ]


def objective(auroc: float, fpr95: float) -> float:
    """What the choice maximizes: the mean of AUROC and 1 - FPR95 (the issue's goal needs both)."""
    return 0.5 * (auroc + 1.0 - fpr95)


def component_scores(bundle, features: dict[str, dict[str, np.ndarray]], standardize_on: dict[str, np.ndarray]) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    """{set: {component: scores standardized by its mean and std on `standardize_on`}} for every component
    of the search space the bundle can fit (a component that cannot be fitted is left out)."""
    out: dict[str, dict[tuple[str, str], np.ndarray]] = {key: {} for key in features}
    for layer, score in dict.fromkeys((*(c for block_set in BLOCK_SETS.values() for c in block_set), *SEMANTIC_POOL)):
        if layer not in bundle.layers:
            continue
        run = build_detector(score, bundle, layer=layer).fit(bundle).score
        reference = run(standardize_on)
        mu, sigma = reference.mean(), reference.std()
        if not sigma > 0:
            continue
        for key, f in features.items():
            out[key][(layer, score)] = (run(f) - mu) / sigma
    return out


def combine(scores: dict[tuple[str, str], np.ndarray], combination: Combination) -> np.ndarray | None:
    """w * (sum of the block components) + sum of the semantic ones; None if a component is missing."""
    if any(c not in scores for c in combination.components):
        return None
    total = sum(scores[c] for c in combination.semantic)
    if combination.block_weight:
        total = total + combination.block_weight * sum(scores[c] for c in combination.block_components)
    return total


def combination_metrics_from_scores(standardized: dict[str, dict[tuple[str, str], np.ndarray]], id_key: str = "id") -> dict[str, dict[str, dict[str, float]]]:
    """{combination name: {OOD set: {"auroc", "fpr95"}}} over every set but `id_key`."""
    out = {}
    for combination in combinations():
        id_scores = combine(standardized[id_key], combination)
        if id_scores is None:
            continue
        by_set = {}
        for key, scores in standardized.items():
            if key == id_key:
                continue
            report = ood_report(id_scores, combine(scores, combination))
            by_set[key] = {"auroc": float(report["auroc"]), "fpr95": float(report["fpr95"])}
        out[combination.name] = by_set
    return out


def combination_metrics(bundle, calibration: dict[str, np.ndarray], features: dict[str, dict[str, np.ndarray]]) -> dict:
    """Every combination of the search space on an evaluated model: standardized on its held-out ID
    split (as `Fused`), ID = features["id"], every other key an OOD set."""
    return combination_metrics_from_scores(component_scores(bundle, features, calibration))


def choose(metrics_by_proxy: list[dict[str, dict[str, float]]], min_block_weight: float = MIN_BLOCK_WEIGHT) -> tuple[str, list[tuple[str, float]]]:
    """(chosen combination, ranking [(name, mean objective)]) over one or more proxies' {name: {"auroc", "fpr95"}}.

    Only combinations every proxy scored and with block weight >= min_block_weight compete. Ties (to
    4 decimals) go to fewer semantic components (cheaper), then to the larger block weight (more
    protection against what the proxy cannot show)."""
    by_name = {c.name: c for c in combinations()}
    ranked = []
    for name, combination in by_name.items():
        if combination.block_weight < min_block_weight or any(name not in m for m in metrics_by_proxy):
            continue
        value = float(np.mean([objective(m[name]["auroc"], m[name]["fpr95"]) for m in metrics_by_proxy]))
        ranked.append((name, value, len(combination.semantic), combination.block_weight))
    if not ranked:
        raise ValueError("no combination was scored on every proxy")
    ranked.sort(key=lambda r: (-round(r[1], 4), r[2], -r[3]))
    return ranked[0][0], [(name, value) for name, value, _, _ in ranked]


def proxy_inputs(spec, budget) -> np.ndarray:
    """Training images of the proxy's 2 held-out known classes, `spec.held_out` (never its test images,
    never an unseen class)."""
    from ncguard.data import load_dataset

    train = load_dataset("fashion-mnist:train")
    rows = np.random.default_rng(2).permutation(len(train.y))
    held = rows[np.isin(train.y[rows], spec.held_out)][: budget.ood_per_set]
    return train.x[held]


def evaluate_proxy(spec, run_dir: Path, budget) -> dict:
    """The proxy's result: every combination (and every single component) on its held-out known classes."""
    import torch

    from training.runs import load_run

    from .evaluate import CALIBRATION, _accuracy, _training_record, cached_features, model_record

    torch.set_num_threads(2)
    started = time.perf_counter()
    model, config, bundle = load_run(run_dir)
    inputs = {CALIBRATION: None, PROXY_OOD: proxy_inputs(spec, budget)}
    features = cached_features(model, config, inputs, run_dir.parent.parent / "features" / f"{spec.name}.npz", spec.name)
    calibration = features.pop(CALIBRATION)
    n = len(calibration["logits"])
    half = n // 2  # standardize on the first half, the second half is the ID side of the proxy question
    standardize = {layer: values[:half] for layer, values in calibration.items()}
    held_id = {layer: values[half:] for layer, values in calibration.items()}
    standardized = component_scores(bundle, {"id": held_id, PROXY_OOD: features[PROXY_OOD]}, standardize)
    combos = combination_metrics_from_scores(standardized)
    singles = {}
    for component, scores in standardized["id"].items():
        report = ood_report(scores, standardized[PROXY_OOD][component])
        singles[f"{component[1]}@{component[0]}"] = {"auroc": float(report["auroc"]), "fpr95": float(report["fpr95"])}
    _, labels = _calibration_labels(config)
    return {
        **model_record(spec, config),
        "classes": list(config["data"]["classes"]),
        "proxy_index": spec.proxy,
        "held_out": list(spec.held_out),
        "id_accuracy": _accuracy(held_id["logits"], labels[half:]) if labels is not None else None,
        "n_id": int(n - half),
        "n_standardize": int(half),
        "n_proxy_ood": int(len(features[PROXY_OOD]["logits"])),
        "proxy": {name: m[PROXY_OOD] for name, m in combos.items()},
        "proxy_singles": singles,
        "training": _training_record(run_dir),
        "seconds": time.perf_counter() - started,
    }


def _calibration_labels(config: dict):
    from training.runs import calibration_inputs

    x, y, _ = calibration_inputs(config, with_labels=True)
    from .evaluate import MAX_CALIBRATION

    return x[:MAX_CALIBRATION], y[:MAX_CALIBRATION]
