"""The bring-your-own-model row: `ncguard fit` on the plain model's ONNX, scored by ONNX Runtime.

The plain cross-entropy model (seed 0) is exported as a bare ONNX network (logits and penultimate
features, no OOD head: what a user already has in production), then `export.byom.fit_existing_model`,
the code behind `ncguard fit`, adds its default score, twice:
- `byom-knn`: read at the penultimate tensor alone (`--features features`, default knn);
- `byom-multi-fused`: read at the set `ncguard inspect` suggests (an early block, a late block, the
  penultimate layer; export.graph_reading.suggested_feature_set), default fused, feature maps
  pooled per channel in the graph.
The fitted graphs' `ood_score` on the same evaluation sets gives the rows, so they measure the
shipped path, graph included. `comparison` says, per set, whether the multi-layer row beats the
single-tensor one (issue 15: it must, on every set).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ncguard.data import load_dataset
from ncguard.ood_metrics import ood_report
from ncguard.runtime import open_session, run_batched

from .evaluate import evaluation_inputs, write_result
from .plan import Budget, model_specs
from .train import is_complete

FIT_ROWS = 20_000  # training images ncguard fit reads (a user's sample of their ID data)


def byom_result(work: Path, budget: Budget, force: bool = False) -> dict | None:
    spec = next(s for s in model_specs(budget) if s.head == "plain" and s.task == "full")
    run_dir = work / "runs" / spec.name
    target = work / "results" / "byom.json"
    if (target.exists() and not force) or not is_complete(run_dir):
        return None
    print(f"[quality] bring-your-own-model row on {spec.name}", flush=True)
    result = byom_rows(run_dir, spec, budget)
    write_result(result, target)
    return result


def byom_rows(run_dir: Path, spec, budget: Budget) -> dict:
    """Both rows (module docstring) for the plain run in `run_dir`, on `spec`'s evaluation sets (a
    near-OOD model also meets its split's unseen classes)."""
    from export.byom import fit_existing_model
    from export.graph_reading import describe_model
    from export.torch_export import torch_to_onnx
    from ncguard.scores.defaults import FOREIGN, FOREIGN_MULTI, default_score
    from training.runs import load_run

    started = time.perf_counter()
    model, config, _ = load_run(run_dir)
    bare = torch_to_onnx(model, None)
    train = load_dataset(config["data"]["spec"])
    rows = np.random.default_rng(0).permutation(len(train.y))[: min(FIT_ROWS, budget.train_limit or FIT_ROWS)]
    sample = replace(train, x=train.x[rows], y=train.y[rows])
    (id_x, id_y), ood, shifts = evaluation_inputs(spec, budget)
    sets = {**ood, **{k: v[0] for k, v in shifts.items()}}
    suggested = describe_model(bare).suggested_feature_set
    if len(suggested) < 2:
        raise RuntimeError(f"ncguard inspect suggests no multi-layer set for the plain model (got {suggested})")
    variants = {  # row name -> (--features, score)
        f"byom-{default_score(FOREIGN)}": (["features"], default_score(FOREIGN)),
        # "multi" also sorts after "knn" in the written JSON, so readers taking the first row keep the single-tensor one
        f"byom-multi-{default_score(FOREIGN_MULTI)}": (suggested, default_score(FOREIGN_MULTI)),
    }
    metrics, fitted, id_accuracy = {}, {}, {}
    for row, (features, score) in variants.items():
        began = time.perf_counter()
        graph, report = fit_existing_model(bare, sample, features=features, logits="logits", score=score, name=row)
        session = open_session(graph.SerializeToString(), provider="cpu")
        id_logits, id_scores = run_batched(session, id_x, ["logits", "ood_score"])
        metrics[row] = {name: ood_report(id_scores, run_batched(session, x, ["ood_score"])[0]) for name, x in sets.items()}
        id_accuracy[row] = float((id_logits.argmax(axis=1) == id_y).mean())
        fitted[row] = {
            "features": list(features), "score": score, "layers": report.layers,
            "parity": [r.describe() for r in report.parity], "seconds": time.perf_counter() - began,
        }
    single, multi = variants
    comparison = {
        name: {"single": metrics[single][name]["auroc"], "multi": metrics[multi][name]["auroc"],
               "multi_wins": metrics[multi][name]["auroc"] > metrics[single][name]["auroc"]}
        for name in sets
    }
    result = {
        "model": f"byom:{spec.name}",
        "score": variants[single][1],
        "fit_rows": int(len(rows)),
        "id_accuracy": id_accuracy[single],
        "metrics": metrics,
        "rows": fitted,
        "comparison": comparison,
        "multi_beats_single_everywhere": all(c["multi_wins"] for c in comparison.values()),
        "parity": fitted[single]["parity"],
        "seconds": time.perf_counter() - started,
    }
    return result


def load_byom(work: Path) -> dict | None:
    path = work / "results" / "byom.json"
    return json.loads(path.read_text()) if path.exists() else None
