"""Study: which training settings give our transfer layer the few-shot transfer issue 16 asks for?

    .venv/bin/python -m benchmarks.quality.few_shot_study --baseline DIR [--baseline DIR ...] --run DIR [--run DIR ...]

Why: the check run's few-shot probe (benchmarks/quality/probe.py: 10 labelled images per class, 50
draws, scikit-learn digits and the glyph letters) put the default's h 3-4 points below the plain
model's, and level with it before h's final ReLU. Retraining the whole quality benchmark per
variant costs hours; this probes finished run directories only (nothing is trained), so a variant
trained once with `ncguard train` is judged in about half a minute.

What it does: for every run (`--run`) and plain baseline (`--baseline`) it computes the probe
features once (`probe.probe_features`: h, h before the head's final ReLU where the backbone has
one, z, the pooled grid) and the few-shot accuracy of each layer on the benchmark's own 50 draws
(`probe.few_shot_probe`). Each run's h is compared draw by draw (`probe.paired_difference`) with
the baseline of the same seed and precision (else the same seed, else the first baseline): the
issue's goal is h at least 2 points above the plain model's h on every task. Runs that differ only
in seed are also pooled, as the quality report pools seeds. Test accuracy and settings come from
each run's own metrics.json and config.json. Writes benchmarks/results/study/few_shot_study.md and
.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ncguard.atomic import atomic_write
from ncguard.run_dir import read_config

from .probe import few_shot_probe, paired_difference, probe_features, probe_tasks
from .report import FEW_SHOT_GOAL_POINTS, few_shot_goal_met

RESULTS = Path(__file__).resolve().parents[1] / "results" / "study"
LAYERS = ("transfer", "transfer-preact", "detection", "grid")
LAYER_NAMES = {"transfer": "h", "transfer-preact": "h before its ReLU", "detection": "z", "grid": "pooled grid"}
SETTINGS = ("head", "arch", "entropy_weight", "classifier", "precision", "seed")


def describe(run: Path) -> dict:
    """Settings, test accuracy and the folder of one run, from its own files (a setting a run predates
    is the value it trained with, as `load_run` assumes)."""
    from training.runs import run_settings

    settings = run_settings(read_config(run))
    metrics = json.loads((run / "metrics.json").read_text())
    return {"run": str(run), **{key: settings.get(key) for key in SETTINGS}, "test_accuracy": (metrics.get("test") or {}).get("accuracy")}


def probe_run(run: Path, tasks: dict) -> dict:
    """{task: {layer: summarize(...)}} of one run's few-shot probe."""
    from training.runs import load_run

    model, _, _ = load_run(run)
    features = {}
    for task, (x, _) in tasks.items():
        every = probe_features(model, x, f"{run.name}: {task}")
        features[task] = {layer: every[layer] for layer in LAYERS if layer in every}
    result = few_shot_probe(features, {task: y for task, (_, y) in tasks.items()})
    return {task: entry["layers"] for task, entry in result["tasks"].items()}


def matching_baseline(run: dict, baselines: list[dict]) -> dict:
    """The baseline trained most like `run`: same seed and precision, else same seed, else the first."""
    for alike in (lambda b: (b["seed"], b["precision"]) == (run["seed"], run["precision"]), lambda b: b["seed"] == run["seed"]):
        found = next((b for b in baselines if alike(b)), None)
        if found is not None:
            return found
    return baselines[0]


def compare(runs: list[dict], baselines: list[dict]) -> None:
    """Add each run's paired h difference to its `matching_baseline`, in place."""
    for run in runs:
        baseline = matching_baseline(run, baselines)
        run["baseline"] = baseline["run"]
        run["vs_baseline"] = {}
        for task, layers in run["probe"].items():
            difference = paired_difference(layers["transfer"]["draws"], baseline["probe"][task]["transfer"]["draws"])
            points = 100 * difference["mean"]
            run["vs_baseline"][task] = {"points": points, "se_points": 100 * difference["se"], "goal_met": few_shot_goal_met(points)}


def by_setting(runs: list[dict]) -> list[dict]:
    """Runs that differ only in seed, pooled: the mean over seeds of test accuracy and of each task's
    paired difference, and whether that mean meets the goal (how the quality report judges seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[key] for key in SETTINGS if key != "seed"), []).append(run)
    pooled = []
    for members in groups.values():
        tasks = {}
        for task in members[0]["vs_baseline"]:
            points = sum(m["vs_baseline"][task]["points"] for m in members) / len(members)
            tasks[task] = {"points": points, "per_seed": [m["vs_baseline"][task]["points"] for m in members],
                           "goal_met": few_shot_goal_met(points)}
        accuracies = [m["test_accuracy"] for m in members if m["test_accuracy"] is not None]
        pooled.append({**{key: members[0][key] for key in SETTINGS if key != "seed"}, "seeds": [m["seed"] for m in members],
                       "test_accuracy": sum(accuracies) / len(accuracies) if accuracies else None, "vs_baseline": tasks})
    return pooled


def _setting_cell(row: dict, with_seed: bool = True) -> str:
    cell = f"{row['head']}, {row['arch']}, entropy {row['entropy_weight']:g}, {row['classifier']}, {row['precision']}"
    return f"{cell}, seed {row['seed']}" if with_seed else cell


def markdown(payload: dict, command: str) -> str:
    tasks = list(payload["baselines"][0]["probe"])
    lines = ["# Few-shot transfer of training variants (issue 16): a study", "",
             f"Written by `{command}` (benchmarks/quality/few_shot_study.py; its docstring says what is computed). "
             "Few-shot probe: 10 labelled images per class, mean test accuracy over the quality benchmark's 50 draws "
             "(± standard error over draws). Goal: our h at least "
             f"{FEW_SHOT_GOAL_POINTS:g} points above the plain model's h on every task; differences are paired draw by draw "
             "against the plain run of the same seed and precision. Seed-to-seed spread is not in the ± (one run per row).", ""]
    header = "| run | settings | test accuracy | " + " | ".join(
        f"{task}: {LAYER_NAMES[layer]}" for task in tasks for layer in LAYERS) + " | " + " | ".join(f"{task}: h − plain h (points)" for task in tasks) + " |"
    lines += [header, "| --- | --- | ---: | " + " | ".join("---:" for _ in tasks for _ in LAYERS) + " | " + " | ".join("---:" for _ in tasks) + " |"]
    for row in payload["baselines"] + payload["runs"]:
        cells = []
        for task in tasks:
            for layer in LAYERS:
                entry = row["probe"][task].get(layer)
                cells.append(f"{entry['mean']:.3f} ± {entry['se']:.3f}" if entry else "")
        for task in tasks:
            versus = row.get("vs_baseline", {}).get(task)
            cells.append(f"{versus['points']:+.1f} ± {versus['se_points']:.1f}{' **met**' if versus['goal_met'] else ''}" if versus else "(baseline)")
        accuracy = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else ""
        lines.append(f"| `{row['run']}` | {_setting_cell(row)} | {accuracy} | " + " | ".join(cells) + " |")
    lines += ["", "Pooled over seeds (runs that differ only in seed; mean of the per-seed paired differences):", "",
              "| settings | seeds | test accuracy (mean) | " + " | ".join(f"{task}: h − plain h (points; per seed)" for task in tasks) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
    for row in payload["pooled"]:
        cells = [f"{row['vs_baseline'][task]['points']:+.1f} ({', '.join(f'{p:+.1f}' for p in row['vs_baseline'][task]['per_seed'])})"
                 f"{' **met**' if row['vs_baseline'][task]['goal_met'] else ''}" for task in tasks]
        accuracy = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else ""
        lines.append(f"| {_setting_cell(row, with_seed=False)} | {', '.join(map(str, row['seeds']))} | {accuracy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, action="append", help="run directory of a plain model (repeatable; matched to runs by seed and precision)")
    parser.add_argument("--run", required=True, action="append", help="run directory of a variant (repeatable)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    tasks = probe_tasks()
    baselines = [{**describe(Path(run)), "probe": probe_run(Path(run), tasks)} for run in args.baseline]
    runs = [{**describe(Path(run)), "probe": probe_run(Path(run), tasks)} for run in args.run]
    compare(runs, baselines)
    payload = {"baselines": baselines, "runs": runs, "pooled": by_setting(runs)}
    command = "python -m benchmarks.quality.few_shot_study " + " ".join(
        [f"--baseline {run}" for run in args.baseline] + [f"--run {run}" for run in args.run])
    out = Path(args.out)
    atomic_write(out / "few_shot_study.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(out / "few_shot_study.md", markdown(payload, command))
    print(f"[few-shot-study] written to {out / 'few_shot_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
