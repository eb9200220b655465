"""The bring-your-own-model row: `ncguard fit` on the plain model's ONNX, scored by ONNX Runtime.

The plain cross-entropy model (seed 0) is exported as a bare ONNX network (logits and penultimate
features, no OOD head: what a user already has in production), then `export.byom.fit_existing_model`,
the code behind `ncguard fit`, adds its default score. The fitted graph's `ood_score` on the same
evaluation sets gives the row, so it measures the shipped path, graph included.
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
    from export.byom import fit_existing_model
    from export.torch_export import torch_to_onnx
    from ncguard.scores.defaults import FOREIGN, default_score
    from training.runs import load_run

    byom_score = default_score(FOREIGN)

    started = time.perf_counter()
    model, config, _ = load_run(run_dir)
    bare = torch_to_onnx(model, None)
    train = load_dataset(config["data"]["spec"])
    rows = np.random.default_rng(0).permutation(len(train.y))[: min(FIT_ROWS, budget.train_limit or FIT_ROWS)]
    sample = replace(train, x=train.x[rows], y=train.y[rows])
    graph, report = fit_existing_model(bare, sample, features="features", logits="logits", score=byom_score, name="byom-plain")
    session = open_session(graph.SerializeToString(), provider="cpu")
    (id_x, id_y), ood, shifts = evaluation_inputs(spec, budget)
    id_logits, id_scores = run_batched(session, id_x, ["logits", "ood_score"])
    metrics = {}
    for name, x in {**ood, **{k: v[0] for k, v in shifts.items()}}.items():
        metrics[name] = ood_report(id_scores, run_batched(session, x, ["ood_score"])[0])
    result = {
        "model": f"byom:{spec.name}",
        "score": byom_score,
        "fit_rows": int(len(rows)),
        "id_accuracy": float((id_logits.argmax(axis=1) == id_y).mean()),
        "metrics": {f"byom-{byom_score}": metrics},
        "parity": [r.describe() for r in report.parity],
        "seconds": time.perf_counter() - started,
    }
    write_result(result, target)
    return result


def load_byom(work: Path) -> dict | None:
    path = work / "results" / "byom.json"
    return json.loads(path.read_text()) if path.exists() else None
