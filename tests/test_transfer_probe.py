"""The few-shot transfer probe (benchmarks/quality/probe.py) and its rows in the quality report.

Arrays stand in for layer features, so no model is trained; one test runs a tiny untrained model.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.quality.ood_sets import GLYPH_LETTERS, SIDE, font_files
from benchmarks.quality.probe import (
    ALL_PROBE_LAYERS,
    few_shot_accuracies,
    few_shot_draws,
    few_shot_probe,
    glyph_task,
    paired_difference,
)
from benchmarks.quality.report import FEW_SHOT_GOAL_POINTS, _few_shot_md, few_shot_summary

N_CLASSES, PER_CLASS = 10, 40


def _labels(per_class: int = PER_CLASS) -> np.ndarray:
    return np.repeat(np.arange(N_CLASSES), per_class)


def _separable(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Features whose first 10 dimensions are the class one-hot plus noise, then 30 noise dimensions."""
    rng = np.random.default_rng(seed)
    return np.hstack([8.0 * np.eye(N_CLASSES)[y], np.zeros((len(y), 30))]) + rng.standard_normal((len(y), N_CLASSES + 30))


def test_a_draw_is_ten_per_class_and_disjoint_from_its_test_rows():
    y = np.random.default_rng(1).permutation(_labels())
    draws = few_shot_draws(y, shots=10, draws=20, seed=0)
    assert len(draws) == 20
    for train, test in draws:
        assert np.array_equal(np.bincount(y[train], minlength=N_CLASSES), np.full(N_CLASSES, 10))
        assert len(np.intersect1d(train, test)) == 0
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y))), "the test is every other row"
    assert len({tuple(train) for train, _ in draws}) == 20, "every draw is a different training set"


def test_draws_need_test_rows_in_every_class():
    with pytest.raises(ValueError):
        few_shot_draws(_labels(per_class=10), shots=10)


def test_results_are_reproducible_by_seed():
    y = _labels()
    features = {"digits": {"transfer": _separable(y), "pixels": np.random.default_rng(2).standard_normal((len(y), 20))}}
    first = few_shot_probe(features, {"digits": y}, draws=5, seed=3)
    assert first == few_shot_probe(features, {"digits": y}, draws=5, seed=3)
    other = few_shot_probe(features, {"digits": y}, draws=5, seed=4)
    assert other["tasks"]["digits"]["layers"]["pixels"]["draws"] != first["tasks"]["digits"]["layers"]["pixels"]["draws"]
    # the draws depend on the labels and the seed only: two "models" meet the same training sets
    assert [t.tolist() for t, _ in few_shot_draws(y, draws=5, seed=3)] == [t.tolist() for t, _ in few_shot_draws(y.copy(), draws=5, seed=3)]


def test_separating_features_score_high_and_random_features_near_chance():
    y = _labels()
    draws = few_shot_draws(y, draws=10, seed=0)
    good = few_shot_accuracies(_separable(y), y, draws)
    noise = few_shot_accuracies(np.random.default_rng(5).standard_normal((len(y), 40)), y, draws)
    assert good.mean() > 0.9
    assert abs(noise.mean() - 1 / N_CLASSES) < 0.05
    result = few_shot_probe({"t": {"transfer": _separable(y)}}, {"t": y}, draws=10)["tasks"]["t"]
    layer = result["layers"]["transfer"]
    assert result["n"] == len(y) and result["classes"] == N_CLASSES
    assert layer["mean"] == pytest.approx(np.mean(layer["draws"])) and len(layer["draws"]) == 10
    assert layer["se"] == pytest.approx(np.std(layer["draws"], ddof=1) / np.sqrt(10))


def test_paired_difference_is_per_draw():
    ours, plain = [0.8, 0.7, 0.9], [0.75, 0.66, 0.86]  # always ~4 points better, though the draws vary a lot
    difference = paired_difference(ours, plain)
    assert difference["mean"] == pytest.approx(0.0433, abs=1e-4)
    assert difference["se"] < 0.01


def _templates() -> tuple[np.ndarray, np.ndarray]:
    """Every letter in every font at every size the renderer uses, centred as it centres them (no offset)."""
    from PIL import Image, ImageDraw, ImageFont

    images, letters = [], []
    for path in font_files():
        for size in range(18, 27):
            font = ImageFont.truetype(str(path), size=size)
            for k, letter in enumerate(GLYPH_LETTERS):
                canvas = Image.new("L", (SIDE, SIDE), 0)
                draw = ImageDraw.Draw(canvas)
                left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
                draw.text(((SIDE - (right - left)) / 2 - left, (SIDE - (bottom - top)) / 2 - top), letter, fill=255, font=font)
                image = np.asarray(canvas, dtype=np.float32) / 255.0
                if image.max() > 0:
                    images.append(image.ravel())
                    letters.append(k)
    return np.stack(images), np.asarray(letters)


def test_glyph_labels_name_the_letter_drawn():
    x, y = glyph_task(per_letter=3, seed=7)
    assert x.shape == (30, 1, SIDE, SIDE) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(np.bincount(y, minlength=len(GLYPH_LETTERS)), np.full(len(GLYPH_LETTERS), 3))
    again = glyph_task(per_letter=3, seed=7)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    # the closest rendering of any letter (every font, size and offset of -2..2 pixels) is the labelled letter
    templates, letters = _templates()
    best = np.full(len(x), np.inf)
    nearest = np.full(len(x), -1)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            moved = np.roll(x[:, 0], (-dy, -dx), axis=(1, 2)).reshape(len(x), -1)
            distance = (moved**2).sum(1)[:, None] - 2 * moved @ templates.T + (templates**2).sum(1)[None]
            closest = distance.argmin(axis=1)
            value = distance[np.arange(len(x)), closest]
            better = value < best
            best[better], nearest[better] = value[better], letters[closest[better]]
    assert np.array_equal(nearest, y), [(GLYPH_LETTERS[a], GLYPH_LETTERS[b]) for a, b in zip(y, nearest) if a != b]


def test_glyph_letters_are_learnable_and_shuffled_labels_are_not():
    x, y = glyph_task(per_letter=30, seed=1)
    pixels = x.reshape(len(x), -1)
    draws = few_shot_draws(y, draws=5, seed=0)
    assert few_shot_accuracies(pixels, y, draws).mean() > 0.3
    shuffled = np.random.default_rng(0).permutation(y)
    assert few_shot_accuracies(pixels, shuffled, few_shot_draws(shuffled, draws=5, seed=0)).mean() < 0.2


def test_probe_features_of_a_tiny_untrained_model():
    from benchmarks.quality.probe import probe_features
    from training.model import build_model

    x, _ = glyph_task(per_letter=1, seed=0)
    features = probe_features(build_model("cnn", (1, SIDE, SIDE), 10).eval(), x, "test")
    assert set(features) == set(ALL_PROBE_LAYERS)
    assert all(len(f) == len(x) and f.ndim == 2 for f in features.values())


def _result(head: str, seed: int, shift: float, tasks=("digits", "glyphs")) -> dict:
    """A result JSON's few-shot probe whose h scores 0.6 + shift (+ per-draw wiggle) on every task."""
    wiggle = np.linspace(-0.05, 0.05, 8)
    layers = {layer: {"mean": 0.5, "se": 0.01, "draws": list(0.5 + wiggle)} for layer in ALL_PROBE_LAYERS}
    layers["transfer"] = {"mean": 0.6 + shift, "se": 0.01, "draws": list(0.6 + shift + wiggle)}
    probe = {"shots": 10, "draws": 8, "seed": 0, "tasks": {t: {"n": 100, "classes": 10, "layers": layers} for t in tasks}}
    return {"head": head, "seed": seed, "few_shot_probe": probe}


def test_report_checks_the_goal_per_task_in_points():
    ours, plain = [_result("etf", 0, 0.03)], [_result("plain", 0, 0.0)]
    summary = few_shot_summary(ours, plain)
    for task in ("digits", "glyphs"):
        assert summary["goal"][task]["ours_minus_plain_points"] == pytest.approx(3.0)
        assert summary["goal"][task]["se_points"] == pytest.approx(0.0, abs=1e-9)
        assert summary["goal"][task]["met"]
    assert summary["goal_met"]
    full = {head: {c: (0.95, 0.0) for c in ALL_PROBE_LAYERS} for head in ("etf", "plain")}
    text = "\n".join(_few_shot_md(summary, full))
    assert "Few-shot transfer probe" in text and "+3.0" in text and "**met**" in text and "digits, full probe" in text

    behind = few_shot_summary([_result("etf", 0, 0.01)], plain)
    assert not behind["goal"]["glyphs"]["met"] and not behind["goal_met"] and FEW_SHOT_GOAL_POINTS == 2.0
    assert "**not met**" in "\n".join(_few_shot_md(behind, full))


def test_report_averages_seeds_and_pairs_them():
    ours = [_result("etf", 0, 0.04), _result("etf", 1, 0.02)]
    plain = [_result("plain", 0, 0.0), _result("plain", 1, 0.0)]
    goal = few_shot_summary(ours, plain)["goal"]["digits"]
    assert goal["ours_minus_plain_points"] == pytest.approx(3.0)
    assert goal["per_seed_points"] == pytest.approx({0: 4.0, 1: 2.0})


def test_results_without_the_few_shot_probe_still_report():
    old = [{"head": "etf", "seed": 0, "probe": {"transfer": 0.95}}], [{"head": "plain", "seed": 0, "probe": {"transfer": 0.95}}]
    assert few_shot_summary(*old) is None
    half = few_shot_summary([_result("etf", 0, 0.03)], old[1])
    assert half["goal"] == {} and not half["goal_met"]
    full = {head: {c: (0.95, 0.0) for c in ALL_PROBE_LAYERS} for head in ("etf", "plain")}
    assert "not checked" in "\n".join(_few_shot_md(half, full))


def _study_row(run: str, seed: int, offset: float) -> dict:
    draws = [0.80 + offset + 0.01 * i for i in range(5)]
    summary = {"mean": float(np.mean(draws)), "se": 0.001, "draws": draws}
    return {"run": run, "head": "etf", "arch": "cnn", "entropy_weight": 0.05, "classifier": "learned", "precision": "bf16",
            "seed": seed, "test_accuracy": 0.93, "probe": {task: {"transfer": summary} for task in ("digits", "glyphs")}}


def test_few_shot_study_pairs_each_run_with_the_plain_run_of_its_seed():
    from benchmarks.quality.few_shot_study import by_setting, compare, markdown, matching_baseline

    baselines = [_study_row("plain-s0", 0, 0.0), _study_row("plain-s1", 1, 0.05)]
    runs = [_study_row("a-s0", 0, 0.02), _study_row("a-s1", 1, 0.06), _study_row("a-s7", 7, 0.01)]
    compare(runs, baselines)
    assert [r["baseline"] for r in runs] == ["plain-s0", "plain-s1", "plain-s0"]  # no seed 7: the first baseline
    fp32 = {**_study_row("plain-s1-fp32", 1, 0.0), "precision": "fp32"}
    assert matching_baseline({**runs[1], "precision": "fp32"}, [*baselines, fp32]) is fp32
    assert matching_baseline({**runs[1], "precision": "fp16"}, [*baselines, fp32])["run"] == "plain-s1"
    assert runs[0]["vs_baseline"]["digits"]["points"] == pytest.approx(2.0) and runs[0]["vs_baseline"]["digits"]["goal_met"]
    assert runs[1]["vs_baseline"]["glyphs"]["points"] == pytest.approx(1.0) and not runs[1]["vs_baseline"]["glyphs"]["goal_met"]
    pooled = by_setting(runs)  # the three runs differ only in seed
    assert len(pooled) == 1 and pooled[0]["seeds"] == [0, 1, 7]
    assert pooled[0]["vs_baseline"]["digits"]["points"] == pytest.approx((2.0 + 1.0 + 1.0) / 3)
    assert not pooled[0]["vs_baseline"]["digits"]["goal_met"]
    text = markdown({"baselines": baselines, "runs": runs, "pooled": pooled}, "cmd")
    assert "+2.0 ± 0.0 **met**" in text and "+1.0 ± 0.0 |" in text and "(baseline)" in text
    assert "| etf, cnn, entropy 0.05, learned, bf16 | 0, 1, 7 | 0.9300 | +1.3 (+2.0, +1.0, +1.0) |" in text
