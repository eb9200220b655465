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
