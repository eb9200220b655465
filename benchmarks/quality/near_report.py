"""The near-OOD page: per split, our scores against the plain model's per-split oracle, and the ID-only choice.

Reads the per-model results of the near-OOD models (task "near": 6 known classes of a split of
plan.NEAR_SPLITS) and of the proxies (task "proxy", benchmarks/quality/select.py; up to three per
split, plan.PROXY_HELD_OUT; the choice uses the ones that are there and says how many); writes
near.md and near.json. Seeds of one split and head are averaged (mean, and standard deviation when there
are several). The baseline on each split is the quality report's oracle: the best standard score
(ncguard.scores.SCORES, on the plain model's penultimate features or logits), chosen separately for
AUROC and FPR95 on that split's unseen classes.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from ncguard.atomic import atomic_write
from ncguard.scores import SCORES

from .ood_sets import COVARIATE_SHIFTS, FAR_OOD, NEAR_OOD
from .plan import NEAR_SPLITS, PROXY_HELD_OUT, Budget, ModelSpec, proxy_spec
from .report import OURS, PLAIN, _mean_sd, beats, oracle, row_table
from .select import DEFAULT_COMBINATION, ROUND1_DEFAULT, ROUND2_DEFAULT, choose, objective

EARLIER_DEFAULTS = {"round 1": ROUND1_DEFAULT, "round 2": ROUND2_DEFAULT}  # shown beside the rounds 3-7 default

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
HELD_OUT = NEAR_OOD[0]
FAR_SETS = (*FAR_OOD, *COVARIATE_SHIFTS)


def _names(classes) -> str:
    return ", ".join(CLASSES[c] for c in classes)


def _combo_table(results: list[dict], metric: str) -> dict[str, dict[str, tuple[float, float]]]:
    """row_table for the combinations of the search space ({combination: {set: (mean, sd)}})."""
    return row_table([{"metrics": r["combinations"] or {}} for r in results], metric)


def split_summary(split: str, near: list[dict], choices: dict[str, str]) -> dict:
    """Everything the page says about one split: oracle, our rows, far-OOD check, every score."""
    by_head = {head: [r for r in near if r["split"] == split and r["head"] == head] for head in (OURS, PLAIN)}
    if not by_head[OURS] or not by_head[PLAIN]:
        return {}
    tables = {head: {m: row_table(rs, m) for m in ("auroc", "fpr95")} for head, rs in by_head.items()}
    combos = {head: {m: _combo_table(rs, m) for m in ("auroc", "fpr95")} for head, rs in by_head.items()}
    far_sets = [s for s in FAR_SETS if s in tables[PLAIN]["auroc"].get("ddu", {})]
    best = oracle(tables[PLAIN]["auroc"], tables[PLAIN]["fpr95"], [HELD_OUT, *far_sets])
    own_oracle = oracle(tables[OURS]["auroc"], tables[OURS]["fpr95"], [HELD_OUT])[HELD_OUT]

    def row(head: str, name: str, kind: str) -> dict | None:
        source = tables[head] if kind == "score" else combos[head]
        if name not in source["auroc"] or HELD_OUT not in source["auroc"][name]:
            return None
        a, f = source["auroc"][name][HELD_OUT], source["fpr95"][name][HELD_OUT]
        far = {s: (source["auroc"][name][s][0], source["fpr95"][name][s][0]) for s in far_sets if s in source["auroc"][name]}
        far_beaten = {s: beats(*far[s], best[s]) for s in far}
        return {
            "head": head, "row": name, "auroc": a, "fpr95": f,
            "beats_oracle": beats(a[0], f[0], best[HELD_OUT]),
            "far_beaten": sum(far_beaten.values()), "far_sets": len(far),
            "far_lost": [s for s, ok in far_beaten.items() if not ok],
            "far_worst_auroc": min((v[0] for v in far.values()), default=float("nan")),
        }

    rows = {
        "ours, default fused": row(OURS, "fused", "score"),
        "plain, fused": row(PLAIN, "fused", "score"),
    }
    for label, name in choices.items():
        if name:
            rows[f"ours, {label}"] = row(OURS, name, "combo")
    best_ours = max((r for r in tables[OURS]["auroc"] if HELD_OUT in tables[OURS]["auroc"][r]), key=lambda r: tables[OURS]["auroc"][r][HELD_OUT][0])
    best_plain_any = max((r for r in tables[PLAIN]["auroc"] if HELD_OUT in tables[PLAIN]["auroc"][r]), key=lambda r: tables[PLAIN]["auroc"][r][HELD_OUT][0])
    hindsight = {}
    for name in combos[OURS]["auroc"]:
        r = row(OURS, name, "combo")
        if r:
            hindsight[name] = {"beats_oracle": r["beats_oracle"], "far_beaten": r["far_beaten"], "far_sets": r["far_sets"],
                               "objective": objective(r["auroc"][0], r["fpr95"][0])}
    return {
        "hindsight": hindsight,
        "known": list(NEAR_SPLITS[split]),
        "unseen": [c for c in range(10) if c not in NEAR_SPLITS[split]],
        "models": {head: [r["model"] for r in rs] for head, rs in by_head.items()},
        "seeds": {head: len(rs) for head, rs in by_head.items()},
        "id_accuracy": {head: _mean_sd([r["id_accuracy"] for r in rs]) for head, rs in by_head.items()},
        "oracle": best,
        "ours_oracle": own_oracle,
        "rows": {k: v for k, v in rows.items() if v},
        "best_single_ours_by_auroc": {"row": best_ours, "auroc": tables[OURS]["auroc"][best_ours][HELD_OUT], "fpr95": tables[OURS]["fpr95"][best_ours][HELD_OUT]},
        "best_any_plain_by_auroc": {"row": best_plain_any, "auroc": tables[PLAIN]["auroc"][best_plain_any][HELD_OUT], "fpr95": tables[PLAIN]["fpr95"][best_plain_any][HELD_OUT]},
        "every_score": {head: {name: {"auroc": t["auroc"][name][HELD_OUT], "fpr95": tables[head]["fpr95"][name][HELD_OUT]} for name in t["auroc"] if HELD_OUT in t["auroc"][name]} for head, t in tables.items()},
        "combinations": {head: {name: {"auroc": c["auroc"][name][HELD_OUT], "fpr95": c["fpr95"][name][HELD_OUT]} for name in c["auroc"] if HELD_OUT in c["auroc"][name]} for head, c in combos.items()},
        "far_sets": far_sets,
    }


SPLIT_CHOICE = "ID-only choice (this split's proxies)"
UNGUARDED_CHOICE = "ID-only choice, unguarded (block weight may be 0)"
POOLED_CHOICE = "ID-only choice pooled over all proxies"


def _proxy_label(spec: ModelSpec) -> str:
    return f"ID-only choice of proxy {spec.proxy + 1} alone (held out {_names(spec.held_out)})"


def proxy_results(results: list[dict]) -> tuple[dict[str, list[tuple[ModelSpec, dict]]], list[str]]:
    """({split: [(spec, result)] in PROXY_HELD_OUT order}, names of proxy results that are not planned or
    were trained on other classes than the plan's (stale: left out of every choice))."""
    planned = {spec.name: spec for spec in (proxy_spec(split, i) for split, pairs in PROXY_HELD_OUT.items() for i in range(len(pairs)))}
    by_split: dict[str, list[tuple[ModelSpec, dict]]] = {}
    stale = []
    for r in results:
        if r["task"] != "proxy":
            continue
        spec = planned.get(r["model"])
        if spec is None or ("classes" in r and list(r["classes"]) != [CLASSES[c] for c in spec.known_classes]):
            stale.append(r["model"])
            continue
        by_split.setdefault(spec.split, []).append((spec, r))
    return {split: sorted(by_split[split], key=lambda sr: sr[0].proxy) for split in NEAR_SPLITS if split in by_split}, sorted(stale)


def _choice(metrics_by_proxy: list[dict]) -> tuple[dict, list[str]]:
    """(the guarded and the unguarded choice over these proxies' metrics, the top of the ranking and the
    default's place; the whole guarded ranking's names)."""
    chosen, ranking = choose(metrics_by_proxy)
    unguarded, _ = choose(metrics_by_proxy, min_block_weight=0.0)
    names = [name for name, _ in ranking]
    default_rank = names.index(DEFAULT_COMBINATION) if DEFAULT_COMBINATION in names else None
    earlier = {label: {"name": name, "rank": names.index(name), "objective": dict(ranking)[name]}
               for label, name in EARLIER_DEFAULTS.items() if name in names}
    return {"chosen": chosen, "unguarded": unguarded, "top": ranking[:8], "default_rank": default_rank,
            "default_objective": dict(ranking).get(DEFAULT_COMBINATION), "earlier_defaults": earlier,
            "candidates": len(ranking)}, names


def selection_summary(by_split: dict[str, list[tuple[ModelSpec, dict]]]) -> dict:
    """{split: choice over the split's proxies (mean objective) with each proxy's own choice, "pooled": over every proxy}."""
    selection = {}
    for split, proxies in by_split.items():
        choice, _ = _choice([r["proxy"] for _, r in proxies])
        own = []
        for spec, r in proxies:
            mine, names = _choice([r["proxy"]])
            rank = names.index(choice["chosen"]) if choice["chosen"] in names else None
            m = r["proxy"][choice["chosen"]]
            own.append({"model": spec.name, "proxy": spec.proxy, "held_out": list(spec.held_out), "trained_on": list(spec.known_classes),
                        "id_accuracy": r.get("id_accuracy"), **mine,
                        "split_choice_rank": rank, "split_choice_objective": objective(m["auroc"], m["fpr95"])})
        trained = {spec.proxy for spec, _ in proxies}
        selection[split] = {**choice, "n_proxies": len(proxies), "planned_proxies": len(PROXY_HELD_OUT[split]), "proxies": own,
                            "not_trained": [proxy_spec(split, i).name for i in range(len(PROXY_HELD_OUT[split])) if i not in trained]}
    everything = [(spec, r) for proxies in by_split.values() for spec, r in proxies]
    if everything:
        selection["pooled"] = {**_choice([r["proxy"] for _, r in everything])[0], "proxies": sorted(spec.name for spec, _ in everything),
                               "n_proxies": len(everything), "splits": sorted(by_split)}
    return selection


def write_near_report(work: Path, out: Path, budget: Budget) -> Path | None:
    from .report import load_results

    results = load_results(work)
    near = [r for r in results if r["task"] == "near"]
    if not near:
        return None
    proxies, stale = proxy_results(results)
    splits = [s for s in NEAR_SPLITS if any(r["split"] == s for r in near)]
    selection = selection_summary(proxies)
    pooled = selection.get("pooled", {}).get("chosen")
    summaries = {}
    for split in splits:
        choices = {
            SPLIT_CHOICE: selection.get(split, {}).get("chosen"),
            UNGUARDED_CHOICE: selection.get(split, {}).get("unguarded"),
            POOLED_CHOICE: pooled,
            **{f"{label}'s default": name for label, name in EARLIER_DEFAULTS.items()},
        }
        if len(proxies.get(split, [])) > 1:  # each proxy's own choice, scored on the real split: how much the pair decides
            choices.update({_proxy_label(spec): own["chosen"] for (spec, _), own in zip(proxies[split], selection[split]["proxies"])})
        summary = split_summary(split, near, choices)
        if summary:
            summaries[split] = summary
    payload = {"budget": budget.name, "machine": f"{platform.machine()}, Python {platform.python_version()}", "splits": summaries, "selection": selection,
               "stale_proxies": stale,
               "trained": sorted(r["model"] for r in results if r["task"] in ("near", "proxy")),
               "training": {r["model"]: r["training"] for r in results if r["task"] in ("near", "proxy")}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "near.json", json.dumps(payload, indent=1, sort_keys=True, default=float))
    atomic_write(out / "near.md", "\n".join(_markdown(payload, budget)) + "\n")
    return out / "near.md"


def _cell(mean_sd) -> str:
    mean, sd = mean_sd
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd else "")


def _markdown(payload: dict, budget: Budget) -> list[str]:
    summaries, selection = payload["splits"], payload["selection"]
    lines = [
        f"# Near OOD: {len(summaries)} 6/4 class splits of Fashion-MNIST",
        "",
        f"Written by `python -m benchmarks.quality --size {budget.name}` ({payload['machine']}, 2 shared CPU cores). "
        f"Models trained: {', '.join(payload['trained'])} (`ncguard train` defaults but {_epochs(budget)} epochs, "
        "`--head etf` is ours, `--head plain` the plain cross-entropy baseline). Seeds per split and head: "
        + ", ".join(f"{s}: {v['seeds'][OURS]}/{v['seeds'][PLAIN]}" for s, v in summaries.items()) + ".",
        "",
        "## Splits",
        "",
        "| split | known (trained on) | unseen (near OOD) | ID-only proxies: held-out known classes (each proxy trains on the split's other 4) |",
        "| --- | --- | --- | --- |",
    ]
    for split in NEAR_SPLITS:
        unseen = [c for c in range(10) if c not in NEAR_SPLITS[split]]
        pairs = "; ".join(f"{i + 1}: {_names(pair)}" for i, pair in enumerate(PROXY_HELD_OUT[split]))
        lines.append(f"| {split} | {_names(NEAR_SPLITS[split])} | {_names(unseen)} | {pairs} |")
    lines += ["", "Why these splits: see `NEAR_SPLITS` in benchmarks/quality/plan.py (chosen from the class names only: every class is unseen at least once, "
              "every split hides an upper-body garment whose look-alikes stay known, a shoe while another shoe stays known, and one class with no close look-alike). "
              "A split's three held-out pairs partition its known classes (every known class plays \"unseen\" once) and each held-out class keeps a look-alike "
              "among its proxy's 4 classes where the split has one (`PROXY_HELD_OUT`, same file).", ""]
    lines += _summary_table(summaries)
    lines += ["## Per split: our scores vs the plain model's per-split oracle (unseen classes)", "",
              "Oracle: for each split separately, the best of the standard scores on the plain model (AUROC and FPR95 chosen separately, so it is optimistic). "
              "**beats** = better on both metrics. Far: of the far-OOD and covariate-shift sets (scored against the same 6 known classes), on how many the row also beats the plain model's per-set oracle.", ""]
    for split, s in summaries.items():
        o = s["oracle"][HELD_OUT]
        lines += [f"### Split {split}: unseen {_names(s['unseen'])}", "",
                  f"ID accuracy (6 classes): ours {_cell(s['id_accuracy'][OURS])}, plain {_cell(s['id_accuracy'][PLAIN])}.", "",
                  "| row | AUROC | FPR95 | beats the oracle | far sets beaten | far sets lost |", "| --- | ---: | ---: | --- | ---: | --- |",
                  f"| plain, oracle of standard scores | {o['auroc']:.3f} ({o['auroc_score']}) | {o['fpr95']:.3f} ({o['fpr95_score']}) | | | |"]
        oo = s["ours_oracle"]
        lines.append(f"| ours, oracle of standard scores (for comparison only) | {oo['auroc']:.3f} ({oo['auroc_score']}) | {oo['fpr95']:.3f} ({oo['fpr95_score']}) | | | |")
        for label, r in s["rows"].items():
            name = f"{label} (`{r['row']}`)" if r["row"] not in ("fused",) else label
            lines.append(f"| {name} | {_cell(r['auroc'])} | {_cell(r['fpr95'])} | {'**beats**' if r['beats_oracle'] else 'no'} | {r['far_beaten']}/{r['far_sets']} | {', '.join(r['far_lost']) or '-'} |")
        b, p = s["best_single_ours_by_auroc"], s["best_any_plain_by_auroc"]
        lines += ["", f"Best row of any kind by AUROC (picked with the unseen classes, so not a method): ours `{b['row']}` {_cell(b['auroc'])} / {_cell(b['fpr95'])}; "
                  f"plain `{p['row']}` {_cell(p['auroc'])} / {_cell(p['fpr95'])}.", ""]
    lines += ["## The ID-only choice of components", "",
              "benchmarks/quality/select.py: proxy models (our head, seed 0), each trained on 4 of the split's 6 known classes; the other 2 known classes "
              "(training images) play the unseen ones, and a split's three proxies hold out every known class once. A split's choice maximizes the "
              "objective averaged over its proxies; the pooled choice averages over every proxy of every split (each proxy counts once). Search space: a block part, Mahalanobis on block1 and block3 (`blocks`) or on block3 alone (`block3`), with weight "
              "w in {0, 0.1, 0.25, 0.5, 1}, plus one or two semantic components (DDU, ETF, KNN, Mahalanobis on the detection or the transfer layer, "
              "ViM on the detection layer) with weight 1, each standardized on held-out ID data; objective: (AUROC + 1 - FPR95) / 2 on the proxy; "
              "guard fixed in advance: w >= 0.1 (the proxy cannot value the far-OOD components). `block3*1+detection:ddu-lowrank` was the default `fused` of rounds 3-7 (today's, the block given the head added as one density, is outside this space: conditional_study.md); `block3*1+detection:ddu` was round 2's, `blocks*1+detection:ddu` round 1's.", ""]
    if payload.get("stale_proxies"):
        lines += ["Left out of every choice (not a planned proxy, or trained on other classes than plan.py's pair now names): "
                  + ", ".join(payload["stale_proxies"]) + ".", ""]
    for key, sel in selection.items():
        if key == "pooled":
            lines += [f"### Pooled over {sel['n_proxies']} proxies of splits {', '.join(sel['splits'])} (one combination for every split: the product-default candidate)", "",
                      f"Proxies: {', '.join(sel['proxies'])}. Chosen: `{sel['chosen']}`; unguarded: `{sel['unguarded']}`; the rounds 3-7 default ranks {_rank(sel)}", ""]
        else:
            lines += [f"### Proxies of split {key} ({sel['n_proxies']} of {sel['planned_proxies']} trained)", "",
                      f"Chosen over the mean of {'its ' + str(sel['n_proxies']) + ' proxies' if sel['n_proxies'] > 1 else 'its one proxy'}: `{sel['chosen']}`; "
                      f"unguarded: `{sel['unguarded']}`; the rounds 3-7 default ranks {_rank(sel)}"
                      + (f" Not trained yet: {', '.join(sel['not_trained'])}." if sel["not_trained"] else ""), "",
                      "| proxy | held out (plays unseen) | trained on | its own choice | its own unguarded choice | rounds 3-7 default's rank | split's choice: rank / objective on this proxy |",
                      "| --- | --- | --- | --- | --- | ---: | ---: |"]
            for own in sel["proxies"]:
                rank = "n/a" if own["split_choice_rank"] is None else str(own["split_choice_rank"] + 1)
                default = "n/a" if own["default_rank"] is None else f"{own['default_rank'] + 1} of {own['candidates']}"
                lines.append(f"| {own['proxy'] + 1} (`{own['model']}`) | {_names(own['held_out'])} | {_names(own['trained_on'])} | `{own['chosen']}` | `{own['unguarded']}` | "
                             f"{default} | {rank} / {own['split_choice_objective']:.4f} |")
            lines.append("")
        lines += ["| rank | combination | proxy objective (mean) |", "| ---: | --- | ---: |"]
        lines += [f"| {i + 1} | `{name}` | {value:.4f} |" for i, (name, value) in enumerate(sel["top"])]
        lines.append("")
    lines += _hindsight(summaries)
    lines += ["## Every score on every layer (unseen classes, AUROC / FPR95)", "",
              "`NAME` is the score on the layer the classifier reads (ours: the detection layer z; plain: the penultimate features h, which are also its `transfer`); "
              "`NAME@LAYER` the same score on another layer (block1-3: per-channel mean and std of a conv block); `fused*`: the multi-layer candidates of evaluate.py.", ""]
    for split, s in summaries.items():
        rows = sorted(set(s["every_score"][OURS]) | set(s["every_score"][PLAIN]), key=lambda r: (r not in SCORES, r))
        lines += [f"### Split {split}", "", "| score | ours AUROC / FPR95 | plain AUROC / FPR95 |", "| --- | --- | --- |"]
        for row in rows:
            cells = []
            for head in (OURS, PLAIN):
                m = s["every_score"][head].get(row)
                cells.append(f"{_cell(m['auroc'])} / {_cell(m['fpr95'])}" if m else "n/a")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Every combination of the search space on every split and both heads is in near.json (`splits.*.combinations`).", ""]
    return lines


SUMMARY_ROWS = ("ours, default fused", f"ours, {SPLIT_CHOICE}", f"ours, {POOLED_CHOICE}", "plain, fused")


def _summary_table(summaries: dict) -> list[str]:
    """One line per split: the oracle and the rows that matter, AUROC / FPR95, with the far-OOD check."""
    present = [label for label in SUMMARY_ROWS if any(label in s["rows"] for s in summaries.values())]
    lines = ["## Summary", "",
             "Unseen classes of each split, AUROC / FPR95; **beats** = better than the plain model's per-split oracle on both; "
             "(far k/9) = on how many of the 9 far-OOD and covariate-shift sets the same row beats the plain model's per-set oracle.", "",
             "| split | plain, oracle of standard scores | " + " | ".join(present) + " |",
             "| --- | --- | " + " | ".join("---" for _ in present) + " |"]
    for split, s in summaries.items():
        o = s["oracle"][HELD_OUT]
        cells = []
        for label in present:
            r = s["rows"].get(label)
            cells.append("n/a" if r is None else
                         f"{r['auroc'][0]:.3f} / {r['fpr95'][0]:.3f}{' **beats**' if r['beats_oracle'] else ''} (far {r['far_beaten']}/{r['far_sets']})")
        lines.append(f"| {split} | {o['auroc']:.3f} ({o['auroc_score']}) / {o['fpr95']:.3f} ({o['fpr95_score']}) | " + " | ".join(cells) + " |")
    chosen = {s["rows"][label]["row"] for s in summaries.values() for label in (f"ours, {POOLED_CHOICE}",) if label in s["rows"]}
    if chosen:
        lines += ["", "Pooled ID-only choice: " + ", ".join(f"`{c}`" for c in sorted(chosen)) + " (benchmarks/quality/select.py)."]
    return lines + [""]


def _hindsight(summaries: dict) -> list[str]:
    """Could any one combination of the search space have won everywhere? Looked up with the unseen
    classes, so this bounds what an ID-only choice from this space could reach; it is not a method."""
    names = set.intersection(*(set(s["hindsight"]) for s in summaries.values())) if summaries else set()
    if not names:
        return []

    def key(name):
        h = [s["hindsight"][name] for s in summaries.values()]
        return (sum(x["beats_oracle"] for x in h), sum(x["far_beaten"] for x in h), float(np.mean([x["objective"] for x in h])))

    ranked = sorted(names, key=key, reverse=True)
    n, far = len(summaries), sum(s["hindsight"][ranked[0]]["far_sets"] for s in summaries.values())
    winners = [name for name in ranked if key(name)[0] == n and key(name)[1] == far]
    lines = ["## Hindsight: could one combination of the search space win everywhere?", "",
             "Looked up with the unseen classes (so not a method, and not used by the choice above): the combinations of our model ranked by "
             f"splits where they beat the plain oracle on the unseen classes, then far sets beaten (of {far}), then the mean objective over splits. "
             + (f"{len(winners)} combination(s) beat the oracle on every split and every far set." if winners else
                "None beats the oracle on every split and every far set."), "",
             "| combination | splits beaten | far sets beaten | mean (AUROC + 1 - FPR95) / 2 |", "| --- | ---: | ---: | ---: |"]
    for name in ranked[:10]:
        beaten, far_beaten, value = key(name)
        lines.append(f"| `{name}` | {beaten}/{n} | {far_beaten}/{far} | {value:.4f} |")
    return lines + [""]


def _rank(sel: dict) -> str:
    if sel["default_rank"] is None:
        return "n/a."
    text = f"{sel['default_rank'] + 1} of {sel['candidates']} (objective {sel['default_objective']:.4f})"
    for label, earlier in sel.get("earlier_defaults", {}).items():
        text += f"; {label}'s default `{earlier['name']}` {earlier['rank'] + 1} ({earlier['objective']:.4f})"
    return text + "."


def _epochs(budget: Budget) -> str:
    epochs = budget.near_epochs if budget.near_epochs is not None else budget.epochs
    return "its default number of" if epochs is None else str(epochs)
