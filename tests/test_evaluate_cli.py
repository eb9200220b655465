"""`ncguard evaluate` on a real (hand-built) model file, and the synthetic OOD SPECs. Torch-free."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from ncguard.data import Dataset, load_dataset
from ncguard.errors import DataError
from ncguard.cli.evaluate import run
from ncguard.ood_data import MAX_NOISE_ROWS, fit_to_shape, inverted_dataset, load_ood_dataset
from ncguard.ood_metrics import ood_report
from ncguard.runtime import Predictor
from tests.tiny_models import write_tiny_model

INPUT_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx", INPUT_SHAPE, n_classes=3, threshold=-0.5)


@pytest.fixture(scope="module")
def id_spec(tmp_path_factory):
    """An ID set labelled with the tiny model's own classes, so accuracy is defined."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "id.npz"
    np.savez(path, x=rng.random((120, *INPUT_SHAPE), dtype=np.float32) * 0.5, y=rng.integers(0, 3, 120), classes=np.array(["class0", "class1", "class2"]))
    return str(path)


def evaluate(model_path, id_spec, oods, out_dir, capsys):
    args = argparse.Namespace(model=str(model_path), id=id_spec, ood=oods, out_dir=str(out_dir), all_scores=None, provider="cpu")
    assert run(args) == 0
    return capsys.readouterr().out, json.loads((out_dir / "evaluation.json").read_text())


def test_report_matches_the_metrics_of_the_model_scores(model_path, id_spec, tmp_path, capsys):
    oods = ["noise:uniform", "inverted:digits:test"]
    out, report = evaluate(model_path, id_spec, oods, tmp_path / "eval", capsys)
    predictor = Predictor(model_path)
    id_data = load_dataset(id_spec)
    id_result = predictor.predict(id_data.x)
    assert report["id"]["accuracy"] == pytest.approx(np.mean(id_result.class_index == id_data.y))
    assert report["id"]["flagged"] == pytest.approx(np.mean(id_result.is_ood))
    for spec in oods:
        ood_x = load_ood_dataset(spec, id_data).x
        ood_scores = predictor.predict(ood_x).ood_score
        expected = ood_report(id_result.ood_score, ood_scores, 0.95)
        for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "n_ood"):
            assert report["ood"][spec][key] == pytest.approx(expected[key], rel=1e-6), (spec, key)
        assert report["ood"][spec]["flagged"] == pytest.approx(np.mean(ood_scores > -0.5))
        assert spec in out
    for png in report["plots"]:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 100
    assert "AUROC" in out and "FPR95" in out


def test_ood_images_of_another_size_are_resized_and_vectors_are_refused(model_path, id_spec, tmp_path, capsys):
    big = tmp_path / "big.npz"
    np.savez(big, x=np.random.default_rng(1).random((20, 3, 28, 28), dtype=np.float32), y=np.zeros(20, dtype=np.int64))
    _, report = evaluate(model_path, id_spec, [str(big)], tmp_path / "eval", capsys)
    assert report["ood"][str(big)]["n_ood"] == 20
    vectors = tmp_path / "vectors.npz"
    np.savez(vectors, x=np.zeros((5, 64), dtype=np.float32), y=np.zeros(5, dtype=np.int64))
    with pytest.raises(DataError, match=r"shape \[64\] but the model takes \[1, 8, 8\]"):
        evaluate(model_path, id_spec, [str(vectors)], tmp_path / "eval2", capsys)


def test_bad_specs_are_clear_errors(model_path, id_spec, tmp_path, capsys):
    with pytest.raises(DataError, match="unknown noise kind 'pink'"):
        evaluate(model_path, id_spec, ["noise:pink"], tmp_path, capsys)
    with pytest.raises(DataError, match="given twice"):
        evaluate(model_path, id_spec, ["noise:uniform", "noise:uniform"], tmp_path, capsys)
    with pytest.raises(DataError, match="unknown data SPEC"):
        evaluate(model_path, id_spec, ["no-such-set"], tmp_path, capsys)


# ---------------------------------------------------------------------- synthetic SPECs and resizing


def test_noise_sets_are_shaped_like_and_moment_matched_to_the_id_data():
    like = load_dataset("digits:test")
    uniform = load_ood_dataset("noise:uniform", like)
    gaussian = load_ood_dataset("noise:gaussian", like)
    assert uniform.x.shape == gaussian.x.shape == like.x.shape and uniform.x.dtype == np.float32
    assert 0.0 <= uniform.x.min() and uniform.x.max() < 1.0 and abs(uniform.x.mean() - 0.5) < 0.01
    assert like.x.min() <= gaussian.x.min() and gaussian.x.max() <= like.x.max()
    assert abs(gaussian.x.mean() - like.x.mean()) < 0.05  # clipping at 0 nudges the mean up a little
    np.testing.assert_array_equal(load_ood_dataset("noise:uniform", like).x, uniform.x)  # seeded: repeatable
    assert len(load_ood_dataset("noise:uniform", load_dataset("fashion-mnist:train"))) == MAX_NOISE_ROWS


def test_inverted_is_one_minus_x_and_needs_unit_range():
    like = load_dataset("digits:test")
    np.testing.assert_array_equal(load_ood_dataset("inverted:digits:test", like).x, 1.0 - like.x)
    with pytest.raises(DataError, match=r"needs values in \[0, 1\]"):
        inverted_dataset(Dataset(like.x * 2, like.y, like.classes, "twice", 1.0))
    with pytest.raises(DataError, match="needs a data SPEC"):
        load_ood_dataset("inverted:", like)


def test_fit_to_shape_converts_channels_and_size_like_pillow():
    rng = np.random.default_rng(0)
    rgb = rng.random((2, 3, 16, 16), dtype=np.float32)
    gray = fit_to_shape(rgb, (1, 16, 16), "rgb")
    np.testing.assert_allclose(gray[:, 0], 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], rtol=1e-5)
    small = fit_to_shape(gray, (1, 8, 8), "gray")
    expected = np.asarray(Image.fromarray(gray[0, 0]).resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(small[0, 0], expected, rtol=1e-6)
    assert fit_to_shape(gray, (3, 16, 16), "gray").shape == (2, 3, 16, 16)
    assert fit_to_shape(gray, (1, 16, 16), "same") is gray
