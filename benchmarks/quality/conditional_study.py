"""Study: the last block's statistics conditioned on the head's features (issue 16, near OOD).

    .venv/bin/python -m benchmarks.quality.conditional_study --near-work WORK --check-work WORK [--check-work WORK ...]

Why: the default `fused` adds Mahalanobis on block3's per-channel [mean, std] to low-rank DDU on the
detection layer, as if the two were independent. They are not: block3's statistics move with what an
image shows as well as with how its pixels look. On a near split whose unseen classes share the known
classes' textures (split c) the block part carries that class-driven ID variation without OOD signal
(alone it scores c's unseen classes at AUROC 0.68) and pulls the sum below DDU alone (0.82 against
0.87), while on split a the same part is what wins. Conditioning keeps only what the head's features
do not explain: the block part scores the residual r = b - A^T [f, 1] of a least-squares regression of
the block statistics b on head features f (the detection layer, the transfer layer, or both), fitted
on the model's fit split, with a tied-covariance Mahalanobis of r around the classes' mean residuals.
For Gaussian features that is -log p(b | f) up to a constant, so the sum reads as one joint density,
-log p(b | f) - log p(f), instead of two densities that count the class content twice. The score is
the product's `conditional-mahalanobis` (ncguard/scores/conditional_mahalanobis.py), fitted here on
statistics streamed from the fit rows, because these runs predate the joint statistic.

What it does, with the trained models and feature caches of `python -m benchmarks.quality --size near`
and `--size check` (nothing is trained): block3's whole-map statistics of every set come from
grid_study's cache (WORK/grid-study/: the same inputs and pooling, computed there if missing); the head
features of the fit split from one pass of the model (cached in WORK/conditional-study/). Each block
part (BLOCK_PARTS: the whole-map statistics, or those and each channel's means on grid_study's 2x2
grid, conditioned on nothing or on head layers) is fitted on the fit split, standardized on held-out
ID data and summed with the default's semantic part (or, JOINT_PARTS, added to it as one density by the
product's `fused --combine joint`), then judged as grid_study judges: the ID-only
proxy objective, the near splits' unseen classes against the plain model's per-split oracle, and the
far sets against the plain model's per-set oracle. Writes benchmarks/results/near/conditional_study.md
and .json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ncguard.atomic import atomic_write
from ncguard.data import load_dataset
from ncguard.scores import Fused, build_detector, make_detector
from ncguard.stats import ClassStatistics, StatisticsBundle, joint_features, joint_name

from . import grid_study
from .evaluate import CALIBRATION, read_feature_cache
from .plan import ModelSpec

RESULTS = grid_study.RESULTS
BLOCK = "block3"
# block part -> (whether it also reads each channel's means on grid_study's 2x2 grid, the head layers it is
# conditioned on); "block3" is today's block component, "block3+grid" what `ncguard train --block-grid 2` scores
BLOCK_PARTS = {
    "block3": (False, ()),
    "block3 given detection": (False, ("detection",)),
    "block3 given transfer": (False, ("transfer",)),
    "block3 given detection, transfer": (False, ("detection", "transfer")),
    "block3+grid": (True, ()),
    "block3+grid given transfer": (True, ("transfer",)),
    "block3+grid given detection, transfer": (True, ("detection", "transfer")),
}
# block parts added to the semantic part as one density (`fused --combine joint`, the product's own Fused)
# instead of as equal standardized parts; "block3 given detection, transfer; joint" is today's default
JOINT_PARTS = {
    "block3; joint": (False, ()),
    "block3 given detection, transfer; joint": (False, ("detection", "transfer")),
}
SEMANTIC = (("detection", "ddu-lowrank"),)  # the default's semantic part


def head_features(run_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """{layer: [N, D]} of the head layers on the run's fit split, cached in `cache`."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    from training.inference import collect_layer_features
    from training.runs import calibration_split, load_run

    model, config, _ = load_run(run_dir)
    fit_index, _ = calibration_split(config)
    x = load_dataset(config["data"]["spec"]).x[fit_index]
    features = collect_layer_features(model, x, ("detection", "transfer"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda stream: np.savez(stream, **features))
    print(f"[conditional-study] head features of {run_dir.name}", flush=True)
    return features


def block_statistics(fit: dict[str, np.ndarray], labels: np.ndarray, bundle: StatisticsBundle, given: tuple[str, ...]) -> StatisticsBundle:
    """The run's bundle with block3's statistics (as the study pools it) refitted on the fit rows, and
    block3's joint statistic with `given`, streamed as `ncguard train` streams them for a run (the runs
    of rounds 3-4 predate the joint statistic)."""
    classes = bundle.classes
    layers = {BLOCK: ClassStatistics(len(classes), per_class_covariance=False, bank_size=0).fit(fit[BLOCK], labels)}
    joint = {}
    if given:
        name = joint_name((BLOCK, *given))
        joint[name] = ClassStatistics(len(classes), per_class_covariance=False, bank_size=0).fit(joint_features(fit, name), labels)
    return StatisticsBundle(layers={**bundle.layers, **layers}, weight=bundle.weight, bias=bundle.bias, classes=classes, joint=joint)


def block_part(given: tuple[str, ...]) -> tuple[str, str]:
    """The fused component that scores block3 given `given` (plain Mahalanobis when it is empty)."""
    return (BLOCK, "conditional-mahalanobis") if given else (BLOCK, "mahalanobis")


def conditional_block_score(fit: dict[str, np.ndarray], labels: np.ndarray, bundle: StatisticsBundle, given: tuple[str, ...]):
    """score({layer: features}) -> [N]: the product's `conditional-mahalanobis` on block3 given `given`
    (plain `mahalanobis` when `given` is empty), fitted on `block_statistics`."""
    fitted = block_statistics(fit, labels, bundle, given)
    if not given:
        return build_detector("mahalanobis", fitted, layer=BLOCK).fit(fitted).score
    return make_detector("conditional-mahalanobis", layer=BLOCK, given=given).fit(fitted).score


def standardized_sums(spec: ModelSpec, work: Path, sets: list[str], split_held_out: bool = False) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{(block part, semantic part): {set: summed standardized score}}, as grid_study.standardized_sums."""
    from training.runs import load_run

    run_dir = work / "runs" / spec.name
    _, _, bundle = load_run(run_dir)
    cached = read_feature_cache(work / "features" / f"{spec.name}.npz")
    grid = grid_study.grid_features(spec, run_dir, work / "grid-study" / f"{spec.name}.npz")
    whole_map = slice(grid["fit"].shape[1] // (grid_study.GRID**2 + 2) * grid_study.GRID**2, None)  # [mean, std] after the grid means
    columns = {False: whole_map, True: slice(None)}  # whatever --block-grid the run itself had
    for name, values in grid.items():
        if name not in ("fit", "fit_y"):
            cached.setdefault(name, {}).update({(BLOCK, gridded): values[:, cut] for gridded, cut in columns.items()})
    head = head_features(run_dir, work / "conditional-study" / f"{spec.name}.npz")
    held = cached[CALIBRATION]
    half = len(held["logits"]) // 2 if split_held_out else 0
    reference = {layer: values[:half] if split_held_out else values for layer, values in held.items()}
    if split_held_out:
        cached["id"] = {layer: values[half:] for layer, values in held.items()}

    scorers = {}
    for part, (gridded, given) in BLOCK_PARTS.items():
        score = conditional_block_score({BLOCK: grid["fit"][:, columns[gridded]], **head}, grid["fit_y"], bundle, given)
        scorers[part] = lambda features, score=score, gridded=gridded: score({**features, BLOCK: features[(BLOCK, gridded)]})
    scorers.update({f"{layer}:{score}": build_detector(score, bundle, layer=layer).fit(bundle).score for layer, score in SEMANTIC})
    standardized = {}
    for key, score in scorers.items():
        on_reference = np.asarray(score(reference))
        mean, sd = on_reference.mean(), on_reference.std()
        standardized[key] = {name: (np.asarray(score(cached[name])) - mean) / sd for name in sets}
    semantic = grid_study._name(SEMANTIC)
    sums = {(part, semantic): {name: standardized[part][name] + sum(standardized[f"{layer}:{score}"][name] for layer, score in SEMANTIC)
                              for name in sets}
            for part in BLOCK_PARTS}
    for part, (gridded, given) in JOINT_PARTS.items():
        fitted = block_statistics({BLOCK: grid["fit"][:, columns[gridded]], **head}, grid["fit_y"], bundle, given)
        as_run = lambda features, gridded=gridded: {**features, BLOCK: features[(BLOCK, gridded)]}  # noqa: E731
        fused = Fused(components=(block_part(given), *SEMANTIC), combine="joint").fit(fitted, as_run(reference))
        sums[(part, semantic)] = {name: fused.score(as_run(cached[name])) for name in sets}
    return sums


def markdown(payload: dict, command: str) -> str:
    models = payload["check_models"]
    baseline = np.asarray(payload["rows"][0]["proxy"])
    lines = ["# Block statistics conditioned on the head's features (issue 16, near OOD): a study", "",
             f"Written by `{command}` (benchmarks/quality/conditional_study.py; its docstring says what is computed).", "",
             "- Block part: `block3` = Mahalanobis on block3's per-channel [mean, std] (the default's block component); "
             "`block3 given f` = Mahalanobis of the residual of those statistics after a least-squares regression on the head "
             "features f, fitted on the fit split; `block3+grid` also reads each channel's means on a 2x2 grid (what "
             "`ncguard train --block-grid 2` scores; grid_study.md). Every row adds the default's semantic part (`detection:ddu-lowrank`), "
             "each part standardized on held-out ID data; rows ending in `; joint` add the two parts as the negative "
             "log-densities they are instead (`fused --combine joint`: 1/2 the squared Mahalanobis distance plus DDU's -log p, one "
             "density over both layers; the default of `ncguard train` since round 8).",
             "- Proxy objective: (AUROC + 1 - FPR95) / 2 on the held-out known classes, mean of the 9 ID-only proxies; in "
             "brackets, on how many of the 9 the row is above the first row (`block3`, the default until round 8).",
             "- Splits a, b, c: unseen classes, AUROC / FPR95, mean of 2 seeds; **beats** = better than the plain model's "
             "per-split oracle on both metrics; far k/9 = far sets of the same models beaten.",
             "- Check k: far sets of a 10-class model beaten (against the oracle of the plain model trained beside it): "
             + "; ".join(f"check {i + 1} = `{work}` ({how})" for i, (work, how) in enumerate(models.items())) + ".", "",
             "| block part | proxy objective | a | b | c | " + " | ".join(f"check {i + 1}" for i in range(len(models))) + " |",
             "| --- | ---: | --- | --- | --- | " + " | ".join("---" for _ in models) + " |"]
    for row in payload["rows"]:
        proxy = np.asarray(row["proxy"])
        cells = [f"{proxy.mean():.4f} ({int((proxy > baseline).sum())}/{len(proxy)})"]
        for split in ("a", "b", "c"):
            r = row["near"][split]
            cells.append(f"{r['auroc']:.3f} / {r['fpr95']:.3f}{' **beats**' if r['beats_oracle'] else ''} (far {r['far_sets'] - len(r['far_lost'])}/{r['far_sets']})")
        for check in row["check"].values():
            lost = ", ".join(f"{name} {a:.4f} / {f:.4f}" for name, (a, f) in check["sets"].items() if name in check["far_lost"])
            cells.append(f"{check['far_sets'] - len(check['far_lost'])}/{check['far_sets']} ({lost or 'none'} lost)")
        lines.append(f"| {row['block']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--near-work", required=True, help="work folder of `python -m benchmarks.quality --size near`")
    parser.add_argument("--check-work", required=True, action="append", help="work folder of `python -m benchmarks.quality --size check` (repeatable)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    out = Path(args.out)
    rows = grid_study.judged_rows(Path(args.near_work), grid_study.near_report(parser, out), args.check_work, standardized_sums)
    payload = {"check_models": {work: grid_study.check_model(Path(work)) for work in args.check_work}, "rows": rows}
    command = f"python -m benchmarks.quality.conditional_study --near-work {args.near_work} " + " ".join(f"--check-work {w}" for w in args.check_work)
    atomic_write(out / "conditional_study.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(out / "conditional_study.md", markdown(payload, command))
    print(f"[conditional-study] written to {out / 'conditional_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
