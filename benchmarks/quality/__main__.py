"""Quality benchmark: `python -m benchmarks.quality [--size full|study|near|check|smoke] [--work DIR] [--stage ...]`.

Stages (default: all, in order): `train` the planned models with `ncguard train`, `evaluate` every
score on every trained model (one JSON per model under WORK/results), `byom` the bring-your-own-model
row (`ncguard fit` on the plain model's ONNX), `cost` the epoch time of both heads on a quiet machine
(run it when nothing else is running), and `report` (Markdown, JSON and PNGs in --out, by
default benchmarks/results/ for the full size; near.md and near.json for the near-OOD splits).
`--size near` trains and reports the near-OOD splits alone (no byom or cost stage). Every stage skips what is already done, so an
interrupted run continues; pass --force to redo evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .plan import BUDGETS, model_specs

STAGES = ("train", "evaluate", "byom", "cost", "report")
RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(BUDGETS), default="full", help="full: the published numbers; study: seed 0 and the training variants; near: the near-OOD splits and their ID-only proxies alone; check: seed 0 of both 10-class models alone; smoke: tiny, for CI")
    parser.add_argument("--work", default="runs/quality", help="folder for data, run directories and per-model results")
    parser.add_argument("--out", default=None, help="where the report goes (default: benchmarks/results for full, benchmarks/results/study for study, benchmarks/results/near for near, WORK/report for smoke)")
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only these stages (repeatable)")
    parser.add_argument("--models", default=None, help="comma-separated model names to train/evaluate (default: all planned)")
    parser.add_argument("--force", action="store_true", help="re-evaluate models that already have results")
    args = parser.parse_args(argv)

    budget = BUDGETS[args.size]
    work = Path(args.work)
    out = Path(args.out) if args.out else (work / "report" if budget.published is None else RESULTS / budget.published)
    stages = args.stage or list(STAGES)
    only = set(args.models.split(",")) if args.models else None
    specs = [spec for spec in model_specs(budget) if not only or spec.name in only]

    if "train" in stages:
        from .train import train_all

        train_all(work, budget, only)
    if "evaluate" in stages:
        from .evaluate import evaluate_run, write_result
        from .train import is_complete

        for spec in specs:
            target = work / "results" / f"{spec.name}.json"
            run_dir = work / "runs" / spec.name
            if (target.exists() and not args.force) or not is_complete(run_dir):
                continue
            print(f"[quality] evaluating {spec.name}", flush=True)
            if spec.task == "proxy":
                from .select import evaluate_proxy

                write_result(evaluate_proxy(spec, run_dir, budget), target)
            else:
                write_result(evaluate_run(spec, run_dir, budget), target)
    if "byom" in stages and budget.full_models:
        from .byom_row import byom_result

        byom_result(work, budget, force=args.force)
    if "cost" in stages and budget.full_models:
        from .cost import measure_cost
        from .train import training_sets

        measure_cost(work, budget, training_sets(work, budget)["full"], force=args.force)
    if "report" in stages:
        from .near_report import write_near_report
        from .report import write_report

        if budget.full_models:
            path = write_report(work, out, budget)
            print(f"[quality] report written to {path}")
        near_path = write_near_report(work, out, budget)
        if near_path:
            print(f"[quality] near-OOD report written to {near_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
