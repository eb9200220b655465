"""Study: does a coarse spatial grid in the last block's statistics help (issue 16, covariate shift)?

    .venv/bin/python -m benchmarks.quality.grid_study --near-work WORK --check-work WORK [--check-work WORK ...]

Why: the block components of `fused` read per-channel [mean, std] of the whole block3 map
(ncguard.pooling). A rotated garment keeps its texture, edges and intensity histogram, so these
globally pooled numbers barely move (block1-2 Mahalanobis AUROC 0.88 on shift-rotate of the 10-class
check model, block3 0.95, against 0.98-1.00 on blur, noise and contrast). Averaging each channel over
a 2x2 grid of the map as well keeps where things are, which rotation changes.

What it does, with the trained models and feature caches of `python -m benchmarks.quality --size near`
and `--size check` (nothing is trained): for each model it runs block3 once more over the same inputs
the benchmark scored (its fit split, its held-out split, every evaluation set), pools it as a run
with `--block-grid 2` does (ncguard.pooling.block_statistics: grid means, then the whole map's
[mean, std]), and fits each block part's tied-covariance Mahalanobis on the fit split itself, so a
model's own `--block-grid` does not matter. Each part is scored like the benchmark's block component
(standardized on held-out ID data, summed with the semantic components). Every pair of block part
(BLOCK_PARTS) and semantic part (SEMANTIC_PARTS) is judged three ways: the ID-only proxy objective
(benchmarks/quality/select.py: the 9 proxies that hold out known classes), the near splits' unseen
classes against the plain model's per-split oracle, and the far sets against the plain model's
per-set oracle (near models, and the 10-class model of each --check-work folder against the plain
model trained beside it). Writes benchmarks/results/near/grid_study.md and .json; grid features are
cached in WORK/grid-study/. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ncguard.atomic import atomic_write
from ncguard.data import load_dataset
from ncguard.ood_metrics import ood_report
from ncguard.run_dir import read_config
from ncguard.scores import build_detector
from ncguard.stats import ClassStatistics, StatisticsBundle

from .evaluate import CALIBRATION, MAX_CALIBRATION, evaluation_inputs, read_feature_cache
from .near_report import HELD_OUT
from .plan import BUDGETS, NEAR_SPLITS, PROXY_HELD_OUT, ModelSpec, proxy_spec
from .report import beats, oracle, row_table
from .select import PROXY_OOD, objective, proxy_inputs

RESULTS = Path(__file__).resolve().parents[1] / "results" / "near"
GRID = 2  # cells per side: the coarsest grid that tells top from bottom and left from right
BLOCK = "block3"
# block3: today's whole-map [mean, std]; block3+grid: one Mahalanobis on [grid means, mean, std] (what a
# run with --block-grid 2 scores); block3, grid: two components, the grid means scored on their own
BLOCK_PARTS = ("block3", "block3+grid", "block3, grid")
SEMANTIC_PARTS = (
    (("detection", "ddu-lowrank"),),  # today's default, with block3
    (("detection", "ddu"),),  # round 2's
    (("detection", "mahalanobis"),),
    (("detection", "ddu-lowrank"), ("detection", "knn")),
    (("detection", "ddu-lowrank"), ("transfer", "knn")),
    (("detection", "ddu-lowrank"), ("detection", "mahalanobis")),
    (("detection", "etf"), ("transfer", "knn")),  # the proxies' pooled choice of round 2b
)


def _name(parts) -> str:
    return "+".join(f"{layer}:{score}" for layer, score in parts)


def grid_block_statistics(model, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """[N, C * GRID^2 + 2C]: block3 pooled as a run trained with `--block-grid GRID` pools it
    (ncguard.pooling.block_statistics: the grid means, then the whole map's [mean, std])."""
    import torch

    from ncguard.pooling import block_statistics

    parts = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            inputs = model.normalize_input(torch.as_tensor(x[start:start + batch], dtype=torch.float32))
            parts.append(block_statistics(model.backbone.forward_features(inputs)[BLOCK], GRID, torch))
    return torch.cat(parts).numpy()


def grid_features(spec: ModelSpec, run_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """{set: block3+grid features} for the fit split ("fit", with "fit_y"), the held-out split and every
    set the benchmark scored on this model, cached in `cache`."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    from training.runs import calibration_split, load_run

    model, config, _ = load_run(run_dir)
    data = load_dataset(config["data"]["spec"])
    fit_index, held_out_index = calibration_split(config)
    inputs = {"fit": data.x[fit_index], CALIBRATION: data.x[held_out_index][:MAX_CALIBRATION]}
    if spec.task == "proxy":
        inputs[PROXY_OOD] = proxy_inputs(spec, BUDGETS["near"])
    else:
        (id_x, _), ood, shifts = evaluation_inputs(spec, BUDGETS["near" if spec.task == "near" else "check"])
        inputs.update({"id": id_x, **ood, **{name: shifted[0] for name, shifted in shifts.items()}})
    features = {name: grid_block_statistics(model, x) for name, x in inputs.items()}
    features["fit_y"] = data.y[fit_index]
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda stream: np.savez(stream, **features))
    print(f"[grid-study] block3 grid features of {spec.name}", flush=True)
    return features


def standardized_sums(spec: ModelSpec, work: Path, sets: list[str], split_held_out: bool = False) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{(block part, semantic part): {set: summed standardized score}}.

    Components are standardized on the held-out split, as the benchmark does; a proxy standardizes on
    its first half and scores the second half as its ID set (`split_held_out`, select.py's protocol).
    """
    from training.runs import load_run

    run_dir = work / "runs" / spec.name
    _, _, bundle = load_run(run_dir)
    cached = read_feature_cache(work / "features" / f"{spec.name}.npz")
    grid = grid_features(spec, run_dir, work / "grid-study" / f"{spec.name}.npz")
    # Every block part is fitted here from the study's own pooling, whatever the run itself recorded
    # (a run trained with --block-grid 2 holds the gridded block3): [grid means | mean, std].
    cells = grid["fit"].shape[1] // (GRID * GRID + 2) * GRID * GRID
    columns = {"block3": slice(cells, None), "block3+grid": slice(None), "grid": slice(0, cells)}
    for name, values in grid.items():
        if name != "fit_y" and name != "fit":
            cached.setdefault(name, {}).update({part: values[:, cut] for part, cut in columns.items()})
    held = cached[CALIBRATION]
    half = len(held["logits"]) // 2 if split_held_out else 0
    reference = {layer: values[:half] if split_held_out else values for layer, values in held.items()}
    if split_held_out:
        cached["id"] = {layer: values[half:] for layer, values in held.items()}

    layers = {part: ClassStatistics(len(bundle.classes), per_class_covariance=False).fit(grid["fit"][:, cut], grid["fit_y"])
              for part, cut in columns.items()}
    grid_bundle = StatisticsBundle(layers=layers, weight=bundle.weight, bias=bundle.bias, classes=bundle.classes, meta=bundle.meta)
    scorers = {(part,): build_detector("mahalanobis", grid_bundle, layer=part).fit(grid_bundle).score for part in layers}
    for part in SEMANTIC_PARTS:
        for layer, score in part:
            scorers.setdefault((layer, score), build_detector(score, bundle, layer=layer).fit(bundle).score)

    standardized = {}
    for key, score in scorers.items():
        on_reference = np.asarray(score(reference))
        mean, sd = on_reference.mean(), on_reference.std()
        standardized[key] = {name: (np.asarray(score(cached[name])) - mean) / sd for name in sets}
    block_components = {"block3": [("block3",)], "block3+grid": [("block3+grid",)], "block3, grid": [("block3",), ("grid",)]}
    return {(block, _name(part)): {name: sum(standardized[c][name] for c in [*block_components[block], *part]) for name in sets}
            for block in BLOCK_PARTS for part in SEMANTIC_PARTS}


def proxy_objectives(work: Path, sums=standardized_sums) -> dict[tuple[str, str], list[float]]:
    """{row key: objective per proxy}; `sums` is a study's `standardized_sums` (this one's by default)."""
    out: dict[tuple[str, str], list[float]] = {}
    for split in NEAR_SPLITS:
        for proxy in range(len(PROXY_HELD_OUT[split])):
            for key, z in sums(proxy_spec(split, proxy), work, ["id", PROXY_OOD], split_held_out=True).items():
                report = ood_report(z["id"], z[PROXY_OOD])
                out.setdefault(key, []).append(objective(report["auroc"], report["fpr95"]))
    return out


def near_results(work: Path, near: dict, sums=standardized_sums) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for split, summary in near["splits"].items():
        far = summary["far_sets"]
        per_seed: dict[tuple[str, str], dict[str, list]] = {}
        for seed in (0, 1):
            spec = ModelSpec(f"near-{split}-etf-s{seed}", "etf", seed, task="near", split=split)
            for key, z in sums(spec, work, ["id", HELD_OUT, *far]).items():
                for name in [HELD_OUT, *far]:
                    report = ood_report(z["id"], z[name])
                    per_seed.setdefault(key, {}).setdefault(name, []).append((report["auroc"], report["fpr95"]))
        for key, by_set in per_seed.items():
            mean = {name: np.mean(values, axis=0) for name, values in by_set.items()}
            best = summary["oracle"]
            out.setdefault(key, {})[split] = {
                "auroc": float(mean[HELD_OUT][0]), "fpr95": float(mean[HELD_OUT][1]),
                "beats_oracle": bool(beats(*mean[HELD_OUT], best[HELD_OUT])),
                "far_lost": [name for name in far if not beats(*mean[name], best[name])], "far_sets": len(far)}
    return out


def check_results(work: Path, sums=standardized_sums) -> dict[tuple[str, str], dict]:
    """Far sets of the 10-class model of a `--size check` work folder, against its own plain model's oracle."""
    plain = json.loads((work / "results" / "plain-s0.json").read_text())
    sets = [name for name in plain["metrics"]["msp"] if name != "id"]
    best = oracle(row_table([plain], "auroc"), row_table([plain], "fpr95"), sets)
    out = {}
    for key, z in sums(ModelSpec("etf-s0", "etf", 0), work, ["id", *sets]).items():
        reports = {name: ood_report(z["id"], z[name]) for name in sets}
        out[key] = {"sets": {name: [r["auroc"], r["fpr95"]] for name, r in reports.items()},
                    "far_lost": [name for name, r in reports.items() if not beats(r["auroc"], r["fpr95"], best[name])], "far_sets": len(sets)}
    return out


def judged_rows(near_work: Path, near: dict, check_works: list[str], sums=standardized_sums) -> list[dict]:
    """Every (block part, semantic part) row of a study judged three ways: the proxies' objectives, the near
    splits and the far sets of each check folder's 10-class model (`sums`: the study's `standardized_sums`)."""
    proxies, splits = proxy_objectives(near_work, sums), near_results(near_work, near, sums)
    checks = {work: check_results(Path(work), sums) for work in check_works}
    return [{"block": block, "semantic": semantic, "proxy": proxies[(block, semantic)], "near": splits[(block, semantic)],
             "check": {work: check[(block, semantic)] for work, check in checks.items()}} for block, semantic in proxies]


def near_report(parser: argparse.ArgumentParser, out: Path) -> dict:
    """The near benchmark's near.json in `out` (its per-split oracles), or a CLI error saying where it comes from."""
    if not (out / "near.json").is_file():
        parser.error(f"{out / 'near.json'} not found: --out must hold the near benchmark's report (python -m benchmarks.quality --size near)")
    return json.loads((out / "near.json").read_text())


def check_model(work: Path) -> str:
    """How the check folder's model of our head was trained: precision and block grid, from its config."""
    from training.runs import run_settings

    settings = run_settings(read_config(work / "runs" / "etf-s0"))
    return f"{settings['precision']}, trained with --block-grid {settings['block_grid']}"


def markdown(payload: dict, command: str) -> str:
    models = payload["check_models"]
    lines = ["# Block3 statistics on a 2x2 grid (issue 16, covariate shift): a study", "",
             f"Written by `{command}` (benchmarks/quality/grid_study.py; its docstring says what is computed).", "",
             "- Block part: `block3` = Mahalanobis on block3's per-channel [mean, std] (256 features, the default); "
             "`block3+grid` = one Mahalanobis on the same plus each channel's means on a 2x2 grid (768 features, what "
             "`ncguard train --block-grid 2` scores); `block3, grid` = two components, the 256 and the 512 grid means, each "
             "standardized.",
             "- Proxy objective: (AUROC + 1 - FPR95) / 2 on the held-out known classes, mean of the 9 ID-only proxies.",
             "- Splits a, b, c: unseen classes, AUROC / FPR95, mean of 2 seeds; **beats** = better than the plain model's "
             "per-split oracle on both metrics; far k/9 = far sets of the same models beaten.",
             "- Check k: far sets of a 10-class model beaten (against the oracle of the plain model trained beside it): "
             + "; ".join(f"check {i + 1} = `{work}` ({how})" for i, (work, how) in enumerate(models.items())) + ".", "",
             "| block part | semantic part | proxy objective | a | b | c | " + " | ".join(f"check {i + 1}" for i in range(len(models))) + " |",
             "| --- | --- | ---: | --- | --- | --- | " + " | ".join("---" for _ in models) + " |"]
    for row in payload["rows"]:
        cells = []
        for split in ("a", "b", "c"):
            r = row["near"][split]
            cells.append(f"{r['auroc']:.3f} / {r['fpr95']:.3f}{' **beats**' if r['beats_oracle'] else ''} (far {r['far_sets'] - len(r['far_lost'])}/{r['far_sets']})")
        for check in row["check"].values():
            cells.append(f"{check['far_sets'] - len(check['far_lost'])}/{check['far_sets']} ({', '.join(check['far_lost']) or 'none'} lost)")
        lines.append(f"| {row['block']} | `{row['semantic']}` | {np.mean(row['proxy']):.4f} | " + " | ".join(cells) + " |")
    default = [row for row in payload["rows"] if row["semantic"] == _name(SEMANTIC_PARTS[0])]
    for i, work in enumerate(models):
        sets = list(default[0]["check"][work]["sets"])
        lines += ["", f"Check {i + 1}, today's semantic part, per far set (AUROC / FPR95):", "",
                  "| block part | " + " | ".join(sets) + " |", "| --- | " + " | ".join("---" for _ in sets) + " |"]
        for row in default:
            lines.append(f"| {row['block']} | " + " | ".join(f"{a:.4f} / {f:.4f}" for a, f in row["check"][work]["sets"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--near-work", required=True, help="work folder of `python -m benchmarks.quality --size near`")
    parser.add_argument("--check-work", required=True, action="append",
                        help="work folder of `python -m benchmarks.quality --size check` (repeatable: models trained by other versions)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    rows = judged_rows(Path(args.near_work), near_report(parser, out), args.check_work)
    payload = {"grid": GRID, "check_models": {work: check_model(Path(work)) for work in args.check_work}, "rows": rows}
    command = f"python -m benchmarks.quality.grid_study --near-work {args.near_work} " + " ".join(f"--check-work {w}" for w in args.check_work)
    atomic_write(out / "grid_study.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(out / "grid_study.md", markdown(payload, command))
    print(f"[grid-study] written to {out / 'grid_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
