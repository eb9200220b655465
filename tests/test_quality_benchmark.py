"""The quality benchmark end to end at smoke size (real training, real scores, real ONNX for the BYOM row).

Fashion-MNIST comes from the Debian package (make system-deps); without it these tests skip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ncguard.data import load_dataset
from ncguard.errors import DataError
from ncguard.scores import SCORES

try:
    load_dataset("fashion-mnist:test")
except DataError:  # pragma: no cover - depends on the machine
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)", allow_module_level=True)

from benchmarks.quality.__main__ import main  # noqa: E402
from benchmarks.quality.ood_sets import COVARIATE_SHIFTS, FAR_OOD, covariate_shift, far_ood_sets, glyph_images  # noqa: E402


def test_ood_sets_are_images_in_range_and_repeatable():
    like = load_dataset("fashion-mnist:test")
    first, again = far_ood_sets(like, 12, seed=3), far_ood_sets(like, 12, seed=3)
    assert list(first) == list(FAR_OOD)
    for name, x in first.items():
        assert x.shape == (12, 1, 28, 28) and x.dtype == np.float32, name
        assert 0.0 <= x.min() and x.max() <= 1.0, name
        np.testing.assert_array_equal(x, again[name])
    assert np.all(glyph_images(50, seed=1).reshape(50, -1).max(axis=1) > 0), "every glyph draws something"


@pytest.mark.parametrize("kind", COVARIATE_SHIFTS)
def test_covariate_shifts_change_images_but_stay_in_range(kind):
    x = load_dataset("fashion-mnist:test").x[:20]
    shifted = covariate_shift(kind, x, seed=0)
    assert shifted.shape == x.shape and 0.0 <= shifted.min() and shifted.max() <= 1.0
    assert np.abs(shifted - x).mean() > 0.01


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    assert main(["--size", "smoke", "--work", str(work)]) == 0
    return work


def test_smoke_run_writes_the_report(smoke_report):
    report = smoke_report / "report"
    for name in ("quality.md", "quality.json", "quality-auroc.png", "quality-training.png", "quality-sets.png"):
        assert (report / name).stat().st_size > 0, name
    summary = json.loads((report / "quality.json").read_text())
    assert summary["sets"] == [*FAR_OOD, *COVARIATE_SHIFTS]
    text = (report / "quality.md").read_text()
    assert "Goal check" in text and "Near OOD" in text and "Bring your own model" in text
    cost = summary["quiet_cost_measurement"]
    assert set(cost["epoch_seconds"]) == {"etf", "plain"} and all(s > 0 for s in cost["epoch_seconds"].values())
    for head in ("etf", "plain"):
        c = summary["training_cost"][head]
        assert c["quiet_epoch_seconds"] == cost["epoch_seconds"][head]
        if np.isfinite(c["epochs_to_target_val"][0]):  # the smoke budget may never reach 93%
            assert c["quiet_seconds_to_target_val"][0] == pytest.approx(c["epochs_to_target_val"][0] * c["quiet_epoch_seconds"])


def test_oracle_is_the_best_standard_score_of_the_plain_model(smoke_report):
    summary = json.loads((smoke_report / "report" / "quality.json").read_text())
    plain = summary["tables"]["plain"]
    for name, best in summary["oracle"].items():
        standard = {row: values[name][0] for row, values in plain["auroc"].items() if row in SCORES}
        assert best["auroc"] == max(standard.values())
        assert best["auroc_score"] in SCORES
        assert best["fpr95"] == min(values[name][0] for row, values in plain["fpr95"].items() if row in SCORES)
    for row, check in summary["goal"].items():
        assert check["wins"] == sum(check["sets"].values())


def test_metrics_are_probabilities_and_early_layers_catch_noise(smoke_report):
    result = json.loads((smoke_report / "results" / "etf-s0.json").read_text())
    assert set(SCORES) <= set(result["metrics"]), result["skipped_scores"]
    assert "fused-conditional" in result["metrics"], result["skipped_scores"]  # a fresh run streams its joint statistic
    for row, by_set in result["metrics"].items():
        for name, report in by_set.items():
            assert 0.0 <= report["auroc"] <= 1.0 and 0.0 <= report["fpr95"] <= 1.0, (row, name)
    # pixel statistics of the first block separate uniform noise from clothing even after one epoch
    assert result["metrics"]["mahalanobis@block1"]["noise-uniform"]["auroc"] > 0.9
    assert 0.0 < result["probe"]["transfer"] <= 1.0
    # the head's inner layers are probed too, and the raw-pixel floor (8x8 digits are easy even as pixels)
    assert set(result["probe"]) >= {"grid", "transfer-preact", "pixels"}
    assert result["probe"]["pixels"] > 0.9


def test_byom_row_keeps_the_plain_models_predictions(smoke_report):
    byom = json.loads((smoke_report / "results" / "byom.json").read_text())
    plain = json.loads((smoke_report / "results" / "plain-s0.json").read_text())
    assert byom["id_accuracy"] == pytest.approx(plain["id_accuracy"], abs=2 / plain["n_id"])  # float32 near-ties only
    assert set(next(iter(byom["metrics"].values()))) == {*FAR_OOD, *COVARIATE_SHIFTS}


def test_study_size_is_seed_zero_and_the_variants_with_the_full_runs_flags():
    from benchmarks.quality.plan import BUDGETS, model_specs, train_flags

    full = {s.name: s for s in model_specs(BUDGETS["full"])}
    study = model_specs(BUDGETS["study"])
    assert [s.name for s in study[:2]] == ["etf-s0", "plain-s0"]
    assert all(s.task == "full" and s.seed == 0 for s in study), "no near-OOD pair, no other seeds"
    assert {s.name for s in study if s.role == "ablation"} == {s.name for s in full.values() if s.role == "ablation"}
    for spec in study:  # same names mean the same runs, so the two sizes can share a work folder
        assert train_flags(spec, BUDGETS["study"]) == train_flags(full[spec.name], BUDGETS["full"])


def test_near_splits_hold_every_class_out_and_proxies_use_known_classes_only():
    from benchmarks.quality.plan import BUDGETS, NEAR_SPLITS, PROXY_HELD_OUT, known_classes, model_specs, train_flags

    unseen = set()
    for split, known in NEAR_SPLITS.items():
        assert len(known) == 6 == len(set(known))
        unseen |= set(range(10)) - set(known)
        for proxy, pair in enumerate(PROXY_HELD_OUT[split]):
            assert set(pair) < set(known), "a proxy holds out known classes, never an unseen one"
            assert set(known_classes("proxy", split, proxy)) == set(known) - set(pair)
    assert unseen == set(range(10)), "every class is unseen in at least one split"
    near = model_specs(BUDGETS["near"])
    assert {s.task for s in near} == {"near", "proxy"}, "the near budget trains no 10-class model"
    assert sorted(s.name for s in near if s.task == "near") == sorted(f"near-{k}-{h}-s{seed}" for k in NEAR_SPLITS for h in ("etf", "plain") for seed in (0, 1, 2))
    assert [s.seed for s in near] == sorted(s.seed for s in near), "every seed-0 model (and proxy) before any seed-1 model"
    full = {s.name: s for s in model_specs(BUDGETS["full"])}
    for spec in near:  # the near size trains the full size's near-OOD runs: same names, same flags
        assert train_flags(spec, BUDGETS["near"]) == train_flags(full[spec.name], BUDGETS["full"])
        assert "--epochs" in train_flags(spec, BUDGETS["near"])
    assert sorted(s.name for s in near if s.task == "proxy") == sorted(f"proxy-{k}{n}-etf-s0" for k in NEAR_SPLITS for n in ("", "2", "3"))


def test_proxy_pairs_partition_each_splits_known_classes_and_the_first_proxy_keeps_its_name():
    from benchmarks.quality.plan import BUDGETS, NEAR_SPLITS, PROXY_HELD_OUT, model_specs, proxy_spec
    from benchmarks.quality.train import _data_file

    round2 = {"a": (2, 3), "b": (4, 7), "c": (6, 9)}  # the pairs the proxies of round 2 were trained on
    for split, known in NEAR_SPLITS.items():
        pairs = PROXY_HELD_OUT[split]
        assert len(pairs) == 3 and all(len(pair) == 2 for pair in pairs)
        assert sorted(c for pair in pairs for c in pair) == sorted(known), "every known class is held out exactly once"
        assert pairs[0] == round2[split]
        first = proxy_spec(split, 0)
        assert (first.name, first.data_key, first.held_out) == (f"proxy-{split}-etf-s0", f"proxy-{split}", round2[split])
        assert _data_file(first.data_key) == f"fmnist-proxy-{split}-train.npz", "round 2's training subset is reused"
        specs = [proxy_spec(split, i) for i in range(3)]
        assert len({s.name for s in specs}) == len({s.data_key for s in specs}) == 3
        assert [s.held_out for s in specs] == list(pairs) and all(s.task == "proxy" and s.seed == 0 for s in specs)
    names = [s.name for s in model_specs(BUDGETS["near"])]
    seed0 = [i for i, name in enumerate(names) if name.startswith("near-") and name.endswith("-s0")]
    for split in NEAR_SPLITS:  # the first proxy right after its split's pair, as in round 2
        assert names.index(f"proxy-{split}-etf-s0") == names.index(f"near-{split}-plain-s0") + 1
        for n in (2, 3):  # the new ones after every split's seed-0 models and before any seed-1 model
            assert max(seed0) < names.index(f"proxy-{split}{n}-etf-s0") < names.index("near-a-etf-s1")
    assert [s.name for s in model_specs(BUDGETS["smoke"]) if s.task == "proxy"] == ["proxy-a-etf-s0", "proxy-b-etf-s0"], "smoke: one proxy per split"


def test_near_training_sets_are_renumbered_known_classes(smoke_report):
    from benchmarks.quality.plan import NEAR_SPLITS

    train = load_dataset("fashion-mnist:train")
    stored = np.load(smoke_report / "data" / "fmnist-near-b-train.npz")
    assert list(stored["classes"]) == [train.classes[c] for c in NEAR_SPLITS["b"]]
    assert set(np.unique(stored["y"])) <= set(range(6))


@pytest.mark.parametrize("proxy", [0, 2])
def test_proxy_question_uses_only_the_proxys_held_out_known_classes(proxy):
    from benchmarks.quality.plan import BUDGETS, PROXY_HELD_OUT, proxy_spec
    from benchmarks.quality.select import proxy_inputs

    train = load_dataset("fashion-mnist:train")
    x = proxy_inputs(proxy_spec("c", proxy), BUDGETS["smoke"])
    # every proxy-OOD image is a training image of one of the 2 known classes this proxy holds out
    held = np.isin(train.y, PROXY_HELD_OUT["c"][proxy])
    labels = {img.tobytes(): label for img, label in zip(train.x[held], train.y[held])}
    assert len(x) == BUDGETS["smoke"].ood_per_set and all(img.tobytes() in labels for img in x)
    assert {labels[img.tobytes()] for img in x} == set(PROXY_HELD_OUT["c"][proxy])


def test_a_splits_choice_averages_its_proxies_and_reports_each_proxys_own():
    from benchmarks.quality.near_report import selection_summary
    from benchmarks.quality.plan import proxy_spec
    from benchmarks.quality.select import Combination, combinations

    ddu, knn, vim = ("detection", "ddu"), ("transfer", "knn"), ("detection", "vim")
    base = {c.name: {"auroc": 0.5, "fpr95": 0.9} for c in combinations()}
    steady, first, second = (Combination((c,), 0.25).name for c in (ddu, knn, vim))
    proxies = []
    for i, best in enumerate((first, second, steady)):  # each proxy alone prefers another one; ddu is good everywhere
        metrics = {**base, steady: {"auroc": 0.85, "fpr95": 0.4}}
        if best != steady:
            metrics[best] = {"auroc": 0.95, "fpr95": 0.3}
        proxies.append((proxy_spec("b", i), {"model": proxy_spec("b", i).name, "proxy": metrics}))
    selection = selection_summary({"b": proxies, "c": proxies[2:]})
    assert selection["b"]["chosen"] == steady and selection["b"]["n_proxies"] == 3 and not selection["b"]["not_trained"]
    assert [own["chosen"] for own in selection["b"]["proxies"]] == [first, second, steady]
    assert [own["held_out"] for own in selection["b"]["proxies"]] == [[4, 7], [1, 6], [3, 9]]
    assert selection["c"]["n_proxies"] == 1 and selection["c"]["not_trained"] == ["proxy-c-etf-s0", "proxy-c2-etf-s0"]
    assert selection["pooled"]["n_proxies"] == 4 and selection["pooled"]["chosen"] == steady


def test_choice_honours_the_block_weight_guard_and_prefers_cheap_ties():
    from benchmarks.quality.select import Combination, choose, combinations

    ddu, knn = ("detection", "ddu"), ("transfer", "knn")
    metrics = {c.name: {"auroc": 0.5, "fpr95": 0.9} for c in combinations()}
    metrics[Combination((knn,), 0.0).name] = {"auroc": 0.95, "fpr95": 0.2}  # best, but drops the blocks
    metrics[Combination((knn,), 0.25).name] = {"auroc": 0.93, "fpr95": 0.3}
    metrics[Combination((ddu, knn), 0.25).name] = {"auroc": 0.93, "fpr95": 0.3}  # a tie with more components
    chosen, ranking = choose([metrics])
    assert chosen == Combination((knn,), 0.25).name
    assert choose([metrics], min_block_weight=0.0)[0] == Combination((knn,), 0.0).name
    assert all(not name.startswith("blocks*0+") for name, _ in ranking)


def test_the_last_block_alone_is_a_block_set_of_its_own():
    from benchmarks.quality.select import Combination, combinations, combine

    names = [c.name for c in combinations()]
    assert len(names) == len(set(names)) and not any(name.startswith("block3*0+") for name in names)
    scores = {("block1", "mahalanobis"): np.array([10.0]), ("block3", "mahalanobis"): np.array([1.0]), ("detection", "ddu"): np.array([2.0])}
    assert combine(scores, Combination((("detection", "ddu"),), 0.5, "block3"))[0] == 2.5
    assert combine(scores, Combination((("detection", "ddu"),), 0.5))[0] == 7.5

def test_near_models_meet_unseen_far_and_shifted_sets_and_the_default_combination_is_fused(smoke_report):
    from benchmarks.quality.select import DEFAULT_COMBINATION, PROXY_OOD

    result = json.loads((smoke_report / "results" / "near-b-etf-s0.json").read_text())
    assert set(result["metrics"]["fused"]) == {"fmnist-held-out", *FAR_OOD, *COVARIATE_SHIFTS}
    assert set(result["shift_accuracy"]) == set(COVARIATE_SHIFTS)
    for name in ("ddu@transfer", "knn@transfer", "etf@block3", "mahalanobis@block1"):
        assert name in result["metrics"], name  # every score on every layer
    # the search space's copy of today's default is the shipped Fused score, computed independently
    for set_name, fused in result["metrics"]["fused"].items():
        combo = result["combinations"][DEFAULT_COMBINATION][set_name]
        assert combo["auroc"] == pytest.approx(fused["auroc"], abs=1e-6) and combo["fpr95"] == pytest.approx(fused["fpr95"], abs=1e-6)
    proxy = json.loads((smoke_report / "results" / "proxy-b-etf-s0.json").read_text())
    assert DEFAULT_COMBINATION in proxy["proxy"] and proxy["n_proxy_ood"] > 0 and PROXY_OOD == "proxy-held-out"


def test_near_report_has_a_table_per_split_and_the_choice(smoke_report):
    report = smoke_report / "report"
    text = (report / "near.md").read_text()
    summary = json.loads((report / "near.json").read_text())
    assert set(summary["splits"]) == {"a", "b"} and set(summary["selection"]) == {"a", "b", "pooled"}  # smoke: 2 splits
    for split in "ab":
        assert f"### Split {split}" in text
        rows = summary["splits"][split]["rows"]
        assert "ours, default fused" in rows and "ours, ID-only choice (this split's proxies)" in rows
        assert summary["selection"][split]["n_proxies"] == 1 and [p["model"] for p in summary["selection"][split]["proxies"]] == [f"proxy-{split}-etf-s0"]
        assert summary["splits"][split]["oracle"]["fmnist-held-out"]["auroc_score"] in SCORES


def test_near_report_uses_every_trained_proxy_of_a_split(smoke_report, tmp_path):
    """The smoke run trains one proxy per split; copies of split a's proxy stand in for its other two
    (each with its plan's classes), and a proxy trained on other classes than the plan's is left out."""
    import shutil

    from benchmarks.quality.near_report import CLASSES, write_near_report
    from benchmarks.quality.plan import BUDGETS, proxy_spec

    shutil.copytree(smoke_report / "results", tmp_path / "results")
    first = json.loads((tmp_path / "results" / "proxy-a-etf-s0.json").read_text())
    for i in (1, 2):
        spec = proxy_spec("a", i)
        copy = {**first, "model": spec.name, "group": spec.group, "classes": [CLASSES[c] for c in spec.known_classes],
                "proxy_index": i, "held_out": list(spec.held_out)}
        (tmp_path / "results" / f"{spec.name}.json").write_text(json.dumps(copy))
    stale = {**json.loads((tmp_path / "results" / "proxy-b-etf-s0.json").read_text()), "model": "proxy-b2-etf-s0"}  # b's first proxy's classes
    (tmp_path / "results" / "proxy-b2-etf-s0.json").write_text(json.dumps(stale))
    write_near_report(tmp_path, tmp_path / "report", BUDGETS["smoke"])
    summary = json.loads((tmp_path / "report" / "near.json").read_text())
    text = (tmp_path / "report" / "near.md").read_text()
    a, b = summary["selection"]["a"], summary["selection"]["b"]
    assert a["n_proxies"] == 3 and [p["held_out"] for p in a["proxies"]] == [[2, 3], [0, 5], [1, 4]]
    assert b["n_proxies"] == 1 and b["not_trained"] == ["proxy-b2-etf-s0", "proxy-b3-etf-s0"] and summary["stale_proxies"] == ["proxy-b2-etf-s0"]
    assert summary["selection"]["pooled"]["n_proxies"] == 4
    assert "### Proxies of split a (3 of 3 trained)" in text and "### Proxies of split b (1 of 3 trained)" in text
    assert "| 2 (`proxy-a2-etf-s0`) | T-shirt/top, Sandal |" in text and "proxy-b2-etf-s0." in text
    rows = summary["splits"]["a"]["rows"]
    assert "ours, ID-only choice of proxy 3 alone (held out Trouser, Coat)" in rows, "each proxy's own choice is scored on the real split"
