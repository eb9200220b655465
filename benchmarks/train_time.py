"""Seconds to 93% test accuracy and final accuracy of the default `ncguard train`, per head, seed and precision.

    .venv/bin/python benchmarks/train_time.py [--seeds 0,1,2] [--heads etf,plain] [--precisions auto,fp32]
                                              [--classifier learned|simplex] [--entropy-weight W]
                                              [--work DIR] [--out DIR] [--name STEM]

Issue 16's goals: 93% Fashion-MNIST test accuracy in at most 5 minutes on 2 cores for the default
configuration, and ID accuracy of the default (etf) head at least the plain head's over 3 seeds. Each
run is `ncguard train --data fashion-mnist [--head H] [--seed S] [--precision P] [--classifier C]
[--entropy-weight W]` with every other setting at its default (`--classifier simplex`: the issue's
class-simplex configuration; `--entropy-weight 0`: what the transfer layer's regularizer costs),
through `training.train.train` (the command's own code), one run after another with the heads and
precisions interleaved seed by seed, so slow spells of a shared machine hit every variant alike. After
every epoch the test split's accuracy is measured by a Trainer callback, outside the epoch's timed
seconds; "seconds to 93%" is the wall time from the start of `train` (data loading included) to the end
of the first epoch at or above 93%, minus the time those test evaluations took.
Writes STEM.json, STEM.md and STEM.png (test accuracy against seconds, one line a run; STEM is --name,
default train_time) to --out (default benchmarks/results), atomically. Not a test: about 5 minutes a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncguard.atomic import atomic_write  # noqa: E402
from ncguard.data import load_dataset, test_split_of  # noqa: E402
from training.inference import accuracy_and_loss  # noqa: E402
from training.train import TrainOptions, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = "fashion-mnist"
TARGET = 0.93
BUDGET_SECONDS = 300.0


class TestAccuracyByEpoch:
    """Trainer callback: the test accuracy after each epoch, and how long measuring it took."""

    def __init__(self, x: np.ndarray, y: np.ndarray, started: float):
        self.x, self.y, self.started = x, y, started
        self.evaluation_seconds = 0.0
        self.epochs: list[dict] = []

    def __call__(self, trainer, record: dict) -> None:
        begin = time.perf_counter()
        accuracy, _ = accuracy_and_loss(trainer.model, self.x, self.y, trainer.device)  # restores the model's mode
        self.epochs.append({"epoch": record["epoch"], "test_accuracy": accuracy, "val_accuracy": record.get("val_accuracy"),
                            "seconds": begin - self.started - self.evaluation_seconds})
        self.evaluation_seconds += time.perf_counter() - begin


def one_run(data: str, head: str, seed: int, precision: str, work: Path, test, classifier: str = "learned",
            entropy_weight: float | None = None) -> dict:
    started = time.perf_counter()
    follow = TestAccuracyByEpoch(*test, started)
    options = TrainOptions(data=data, out=str(work / f"{head}-{classifier}-{entropy_weight}-{precision}-s{seed}"), head=head, seed=seed,
                           precision=precision, classifier=classifier, entropy_weight=entropy_weight, quiet=True).validated()
    summary = train(options, callbacks=[follow])
    total = time.perf_counter() - started - follow.evaluation_seconds
    reached = next((e["seconds"] for e in follow.epochs if e["test_accuracy"] >= TARGET), None)
    config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())
    changed = ([f"{classifier} classifier"] if classifier != "learned" else []) + ([f"entropy weight {entropy_weight:g}"] if entropy_weight is not None else [])
    head = f"{head} ({', '.join(changed)})" if changed else head
    return {"head": head, "seed": seed, "precision": config["settings"]["precision"], "epochs": follow.epochs,
            "test_accuracy": summary["test_accuracy"], "seconds_to_target": reached, "total_seconds": total}


def summarize(runs: list[dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['head']} {run['precision']}", []).append(run)
    out = {}
    for name, group in groups.items():
        reached = [r["seconds_to_target"] for r in group if r["seconds_to_target"] is not None]
        out[name] = {
            "runs": len(group),
            "test_accuracy_mean": float(np.mean([r["test_accuracy"] for r in group])),
            "test_accuracy_std": float(np.std([r["test_accuracy"] for r in group])),
            "reached_target": len(reached),
            "seconds_to_target_median": float(np.median(reached)) if reached else None,
            "total_seconds_median": float(np.median([r["total_seconds"] for r in group])),
        }
    return out


def markdown(payload: dict, stem: str = "train_time") -> str:
    lines = ["# Training time and accuracy of the default configuration", "",
             f"Written by `python benchmarks/train_time.py {payload['arguments']}` ({payload['machine']}). "
             f"Data `{payload['data']}`, every `ncguard train` default except the settings named. "
             f"Seconds to {TARGET:.0%}: wall time from the start of training (data loading included) to the end of the first "
             f"epoch whose test accuracy is at or above {TARGET:.0%} (test evaluations excluded). Goal (issue 16): "
             f"{TARGET:.0%} in at most {BUDGET_SECONDS / 60:.0f} min, and the etf head's accuracy at least the plain head's.", "",
             "| head, precision | runs | test accuracy (mean +- std) | reached 93% | seconds to 93% (median) | whole run, s (median) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in payload["summary"].items():
        reached = f"{s['seconds_to_target_median']:.0f}" if s["seconds_to_target_median"] is not None else "-"
        lines.append(f"| {name} | {s['runs']} | {s['test_accuracy_mean']:.4f} +- {s['test_accuracy_std']:.4f} | "
                     f"{s['reached_target']}/{s['runs']} | {reached} | {s['total_seconds_median']:.0f} |")
    lines += ["", "| head | precision | seed | test accuracy | seconds to 93% | epoch reached | whole run, s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in payload["runs"]:
        epoch = next((e["epoch"] for e in r["epochs"] if e["test_accuracy"] >= TARGET), None)
        seconds = f"{r['seconds_to_target']:.0f}" if r["seconds_to_target"] is not None else "-"
        lines.append(f"| {r['head']} | {r['precision']} | {r['seed']} | {r['test_accuracy']:.4f} | {seconds} | {epoch or '-'} | {r['total_seconds']:.0f} |")
    lines += ["", f"![test accuracy against seconds]({stem}.png)"]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.0, 4.2))
    styles = {"etf": "-", "plain": "--", "l2": ":"}  # by the head's name, before any "(... classifier)"
    for run in runs:
        seconds = [e["seconds"] for e in run["epochs"]]
        accuracy = [e["test_accuracy"] for e in run["epochs"]]
        axes.plot(seconds, accuracy, styles.get(run["head"].split()[0], "-"), marker=".",
                  label=f"{run['head']} {run['precision']} seed {run['seed']}")
    axes.axhline(TARGET, color="grey", linewidth=0.8)
    axes.axvline(BUDGET_SECONDS, color="grey", linewidth=0.8)
    axes.set_ylim(0.88, 0.945)
    axes.set_xlabel("seconds since the start of training (test evaluations excluded)")
    axes.set_ylabel("Fashion-MNIST test accuracy")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=110))
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA, help="a data SPEC with a test split (digits: a quick smoke run)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--heads", default="etf,plain")
    parser.add_argument("--precisions", default="auto", help="comma-separated --precision values (auto, fp32, bf16)")
    parser.add_argument("--work", default=None, help="folder for the run directories (default: a temporary one)")
    parser.add_argument("--classifier", default="learned", help="--classifier of every run: learned (the default) or simplex")
    parser.add_argument("--entropy-weight", type=float, default=None, help="--entropy-weight of every run (default: the head's)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="train_time", help="file stem of the results (default: train_time)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    heads, precisions = args.heads.split(","), args.precisions.split(",")
    test = load_dataset(test_split_of(args.data))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arguments = " ".join(f"--{k} {v}" for k, v in (("data", args.data), ("seeds", args.seeds), ("heads", args.heads), ("precisions", args.precisions),
                                                    ("classifier", args.classifier))
                         + ((("entropy-weight", f"{args.entropy_weight:g}"),) if args.entropy_weight is not None else ()))
    payload = {"machine": f"{platform.machine()}, Python {platform.python_version()}", "arguments": arguments, "data": args.data, "runs": []}
    with tempfile.TemporaryDirectory(prefix="train-time-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        for seed in seeds:
            for precision in precisions:
                for head in heads:
                    run = one_run(args.data, head, seed, precision, work, (test.x, test.y), args.classifier, args.entropy_weight)
                    payload["runs"].append(run)
                    print(f"[train-time] {run['head']} {run['precision']} seed {seed}: test {run['test_accuracy']:.4f}, "
                          f"93% after {run['seconds_to_target'] or float('nan'):.0f} s, whole run {run['total_seconds']:.0f} s", flush=True)
                    payload["summary"] = summarize(payload["runs"])
                    # written after every run: a long benchmark stopped midway keeps what it measured
                    atomic_write(out / f"{args.name}.json", json.dumps(payload, indent=1) + "\n")
                    atomic_write(out / f"{args.name}.md", markdown(payload, args.name))
                    plot(payload["runs"], out / f"{args.name}.png")
    print(f"[train-time] written to {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
