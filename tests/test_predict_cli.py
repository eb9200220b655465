"""`ncguard predict` on a real (hand-built) model file: images, .npy, .npz, JSON and errors. Torch-free."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from ncguard.errors import DataError
from ncguard.images import decode_image
from ncguard.cli.predict import gather_inputs, run
from ncguard.runtime import Predictor
from tests.tiny_models import write_tiny_model

INPUT_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx", INPUT_SHAPE, n_classes=3, threshold=-0.5)


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "digit.png"
    Image.fromarray(rng.integers(0, 256, (16, 12), dtype=np.uint8)).save(png)  # another size: resized on decode
    single = tmp_path / "one.npy"
    np.save(single, rng.random(INPUT_SHAPE, dtype=np.float32))
    batch = tmp_path / "batch.npy"
    np.save(batch, rng.random((3, *INPUT_SHAPE), dtype=np.float32))
    labelled = tmp_path / "mixed.npz"
    np.savez(labelled, x=rng.random((2, *INPUT_SHAPE)).astype(np.float32), kind=np.array(["id", "noise"]))
    return {"png": png, "single": single, "batch": batch, "npz": labelled}


def predict(model_path, paths, capsys, as_json=False):
    args = argparse.Namespace(model=str(model_path), files=[str(p) for p in paths], json=as_json, provider="cpu")
    assert run(args) == 0
    return capsys.readouterr().out


def test_json_rows_match_the_predictor_on_the_same_inputs(model_path, files, capsys):
    paths = [files["png"], files["single"], files["batch"], files["npz"]]
    document = json.loads(predict(model_path, paths, capsys, as_json=True))
    rows = document["predictions"]
    assert [r["input"] for r in rows] == [
        str(files["png"]), str(files["single"]),
        *(f"{files['batch']}[{i}]" for i in range(3)),
        *(f"{files['npz']}[{i}]" for i in range(2)),
    ]
    assert [r.get("kind") for r in rows][-2:] == ["id", "noise"] and "kind" not in rows[0]
    with np.load(files["npz"]) as npz:
        x = np.concatenate([
            decode_image(files["png"], channels=1, size=(8, 8))[None],
            np.load(files["single"])[None],
            np.load(files["batch"]),
            npz["x"],
        ])
    expected = Predictor(model_path, provider="cpu").predict(x)
    np.testing.assert_allclose([r["ood_score"] for r in rows], expected.ood_score, rtol=1e-6)
    np.testing.assert_allclose([r["confidence"] for r in rows], expected.confidence, rtol=1e-6)
    assert [r["class_index"] for r in rows] == expected.class_index.tolist()
    assert [r["label"] for r in rows] == [f"class{i}" for i in expected.class_index]
    assert [r["is_ood"] for r in rows] == (expected.ood_score > document["threshold"]).tolist()
    assert document["providers"] == ["CPUExecutionProvider"]


def test_table_has_one_line_per_input_with_a_decision(model_path, files, capsys):
    out = predict(model_path, [files["batch"], files["npz"]], capsys).splitlines()
    assert out[0].split() == ["input", "kind", "label", "confidence", "ood_score", "decision"]
    assert len(out) == 1 + 5
    assert all(line.rstrip().endswith(("OOD", "in-distribution")) for line in out[1:])
    assert "noise" in out[-1]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: np.save(d / "bad.npy", np.zeros((2, 3))), r"shape \[2, 3\]"),
        (lambda d: np.savez(d / "bad.npz", y=np.zeros(3)), "no array named 'x'"),
        (lambda d: np.savez(d / "bad.npz", x=np.zeros((2, *INPUT_SHAPE)), kind=np.array(["a"])), "must be 2 strings"),
        (lambda d: np.save(d / "bad.npy", np.array([None, 1], dtype=object), allow_pickle=True), "object arrays are refused"),
        (lambda d: (d / "bad.txt").write_text("hello"), "expected an image"),
        (lambda d: (d / "bad.png").write_bytes(b"not a png"), "bad.png"),
        (lambda d: np.save(d / "bad.npy", np.full((1, *INPUT_SHAPE), np.nan)), "NaN"),
    ],
)
def test_bad_files_are_data_errors_that_name_the_problem(model_path, tmp_path, make, message):
    make(tmp_path)
    bad = next(p for p in tmp_path.iterdir() if p.name.startswith("bad"))
    with pytest.raises(DataError, match=message):
        Predictor(model_path).predict(gather_inputs([str(bad)], INPUT_SHAPE).x)


def test_missing_file_and_images_for_a_vector_model(tmp_path, files):
    with pytest.raises(DataError, match="no such file"):
        gather_inputs([str(tmp_path / "absent.npy")], INPUT_SHAPE)
    with pytest.raises(DataError, match="is an image"):
        gather_inputs([str(files["png"])], (64,))


def test_predict_evaluate_and_the_score_graphs_run_without_torch(model_path, files, tmp_path):
    """DESIGN.md: scoring an exported model, and building score graphs (bring your own model), need no torch."""
    import subprocess
    import sys
    import textwrap

    from tests.test_torch_free import BLOCK_TORCH

    code = textwrap.dedent(
        f"""
        import argparse, sys
        import export.score_graph, export.parity
        from ncguard.cli.predict import run as predict
        from ncguard.cli.evaluate import run as evaluate
        assert predict(argparse.Namespace(model={str(model_path)!r}, files=[{str(files['npz'])!r}], json=True, provider=None)) == 0
        assert evaluate(argparse.Namespace(model={str(model_path)!r}, id="digits:test", ood=["noise:uniform"],
                        out_dir={str(tmp_path / 'eval')!r}, all_scores=None, provider=None)) == 0
        assert "torch" not in sys.modules
        """
    )
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"predictions"' in done.stdout and (tmp_path / "eval" / "evaluation.json").is_file()
