"""The OOD part's cost in several exported models, profiled alternately: a before/after of a graph change.

    .venv/bin/python benchmarks/graph_ab.py --model LABEL=FILE.onnx --model LABEL=FILE.onnx [--rounds 3] [--calls 200]

`fused_cost.py` exports one run per set of components with today's code; a change to how a score is
*written* as a graph needs the same model exported by two versions of the code instead (e.g.
`ncguard export RUN --out before.onnx` in a worktree of the old commit, and again at the new one).
Each round measures every model in turn (benchmarks/serving/local_paths.ood_cost_both_ways: the
profiler's share and the wall-clock share), so load drifting during the session falls on all of them;
the medians over rounds are reported. Writes graph_ab.json and .md (atomically) to
--out. Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "serving"))

from local_paths import ood_cost_both_ways  # noqa: E402
from ncguard.atomic import atomic_write  # noqa: E402
from ncguard.errors import ConfigError  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCHES = [1, 64]


def labelled(text: str) -> tuple[str, Path]:
    """"before=/tmp/a.onnx" -> ("before", Path("/tmp/a.onnx"))."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise ConfigError(f"--model takes LABEL=FILE.onnx, got {text!r}")
    if not Path(path).is_file():
        raise ConfigError(f"--model {label}: no file {path}")
    return label, Path(path)


def measure(models: list[tuple[str, Path]], rounds: int, calls: int) -> dict[str, dict]:
    """{label: {batch: {"ood_adds": median, "ood_us", "rest_us", "wall_adds", "rounds": [...]}, "ood_nodes": n}}."""
    samples: dict[str, dict[int, list[tuple[float, float, float, float]]]] = {label: {b: [] for b in BATCHES} for label, _ in models}
    nodes = {}
    for round_index in range(rounds):
        for label, path in models:
            costs = ood_cost_both_ways(path, BATCHES, calls=calls)
            for batch in BATCHES:
                cost = costs[str(batch)]
                samples[label][batch].append((cost["ood_adds"], cost["ood_us"], cost["rest_us"], cost["wall_adds"]))
                nodes[label] = len(cost["ood_nodes"])
            print(f"[graph-ab] round {round_index + 1}/{rounds} {label}: "
                  + ", ".join(f"batch {b}: +{samples[label][b][-1][0]:.1%} (wall clock {samples[label][b][-1][3]:+.1%})" for b in BATCHES), flush=True)
    out = {}
    for label, by_batch in samples.items():
        out[label] = {"ood_nodes": nodes[label]}
        for batch, values in by_batch.items():
            columns = list(zip(*values))
            out[label][str(batch)] = {"ood_adds": statistics.median(columns[0]), "ood_us": statistics.median(columns[1]),
                                      "rest_us": statistics.median(columns[2]), "wall_adds": statistics.median(columns[3]),
                                      "rounds": [round(v, 4) for v in columns[0]]}
    return out


def markdown(payload: dict, command: str) -> str:
    lines = ["# The OOD part's cost, exported models profiled alternately", "",
             f"Written by `{command}` ({payload['machine']}; {payload['rounds']} rounds, {payload['calls']} profiled calls per "
             "model, batch size and round). Profiler: kernel time of the OOD-only nodes over the rest of the graph, in the same "
             "calls (median over rounds; in brackets the OOD part's and the rest's microseconds per call, and every round's share). "
             "Wall clock: median over paired calls of the graph against the same graph without the OOD part, minus 1. Goal "
             "(issue 16, by the profiler): at most +15% at batch 1 and +5% at batch 64.", "",
             "| model | file | OOD nodes | batch 1 | batch 64 | batch 1, wall clock | batch 64, wall clock |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, r in payload["models"].items():
        cells = [f"+{r[b]['ood_adds']:.1%} ({r[b]['ood_us']:.0f} of {r[b]['rest_us']:.0f} us; rounds "
                 + ", ".join(f"{v:.1%}" for v in r[b]["rounds"]) + ")" for b in ("1", "64")]
        cells += [f"{r[b]['wall_adds']:+.1%}" for b in ("1", "64")]
        lines.append(f"| {label} | `{payload['files'][label]}` | {r['ood_nodes']} | " + " | ".join(cells) + " |")
    if payload.get("notes"):
        lines += ["", payload["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, action="append", help="LABEL=FILE.onnx, an exported model; repeat it")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all models")
    parser.add_argument("--calls", type=int, default=200, help="profiled (and paired wall-clock) calls per model, batch size and round")
    parser.add_argument("--notes", default="", help="a paragraph appended to the report (how the files were made)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for graph_ab.json and .md")
    args = parser.parse_args(argv)
    try:
        models = [labelled(text) for text in args.model]
        if len({label for label, _ in models}) < len(models):
            raise ConfigError("--model labels must differ")
        if args.rounds < 1 or args.calls < 1:
            raise ConfigError("--rounds and --calls must be at least 1")
    except ConfigError as exc:
        parser.error(str(exc))
    payload = {"machine": f"{platform.machine()}, Python {platform.python_version()}", "rounds": args.rounds, "calls": args.calls,
               "files": {label: str(path) for label, path in models}, "notes": args.notes,
               "models": measure(models, args.rounds, args.calls)}
    command = "python benchmarks/graph_ab.py " + " ".join(f"--model {label}={path}" for label, path in models) + f" --rounds {args.rounds} --calls {args.calls}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "graph_ab.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(out / "graph_ab.md", markdown(payload, command))
    print(f"[graph-ab] written to {out / 'graph_ab.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
