"""Train digits -> export -> run: the exported file's contract, parity for every score, OOD separation.

Uses the session's real digits run and its export (tests/conftest.py: digits_run_dir, digits_model_path).
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.cli import run_export
from export.run import export_run
from export.parity import compare_scores
from export.torch_export import check_parity, finish_graph, parity_inputs, torch_outputs, torch_to_onnx
from ncguard.calibration import calibrate_threshold
from ncguard.data import load_dataset
from ncguard.errors import ConfigError, ModelError
from ncguard.model_file import COMPONENTS_OUTPUT, INPUT_NAME, OUTPUT_NAMES, load_model
from ncguard.ood_data import load_ood_dataset
from ncguard.ood_metrics import auroc
from ncguard.runtime import Predictor, open_session, run_batched
from ncguard.scores import SCORES, build_detector, make_detector
from ncguard.stats import ClassStatistics
from training.inference import fit_on_held_out
from training.runs import calibration_inputs, load_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(digits_run_dir):
    model, config, bundle = load_run(digits_run_dir)
    return model, config, bundle


@pytest.fixture(scope="module")
def network(run):
    """The trained network alone, exported once with its detection layer as an extra output."""
    model, _, _ = run
    return torch_to_onnx(model, ("detection",))


@pytest.fixture(scope="module")
def test_inputs():
    """ID inputs the model never trained on, and OOD inputs it never saw in any form."""
    id_data = load_dataset("digits:test")
    return id_data, load_ood_dataset("noise:uniform", id_data).x[:300], load_ood_dataset("inverted:digits:test", id_data).x


def test_the_file_meets_the_model_artifact_contract(digits_model_path, digits_run_dir, run):
    model, config, bundle = run
    assert sorted(os.listdir(digits_model_path.parent)) == ["digits.onnx"]  # one file, no external data
    loaded = load_model(digits_model_path)  # checksum and metadata verified
    proto = loaded.proto
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 10
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [*OUTPUT_NAMES, COMPONENTS_OUTPUT]
    batch_dims = [v.type.tensor_type.shape.dim[0] for v in [*proto.graph.input, *proto.graph.output]]
    assert all(d.dim_param and not d.dim_value for d in batch_dims)  # dynamic batch axis everywhere
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)

    meta = loaded.metadata
    assert meta.classes == [str(d) for d in range(10)] and meta.input_shape == [1, 8, 8] and meta.input_scale == 16.0
    assert (meta.score, meta.tpr, meta.run_id) == (config["settings"]["score"], 0.95, config["run_id"])
    assert meta.statistics_checksum == bundle.checksum()
    counts = bundle.layers["detection"].counts_
    np.testing.assert_allclose(meta.drift_reference.class_priors, counts / counts.sum())
    np.testing.assert_allclose(meta.drift_reference.feature_mean, bundle.layers["transfer"].global_mean_)
    np.testing.assert_allclose(meta.drift_reference.feature_std, bundle.layers["transfer"].feature_std_)

    # The threshold keeps 95% of the held-out ID split training used, scored by the NumPy reference.
    calibration_x, _ = calibration_inputs(config)
    # (the default, fused, has its components standardized on that same split)
    detector = fit_on_held_out(build_detector(meta.score, bundle), bundle, model, calibration_x)
    reference = detector.score(torch_outputs(model, calibration_x, detector.layers))
    assert meta.threshold == pytest.approx(calibrate_threshold(reference, 0.95), rel=1e-4)
    graph_scores = Predictor(loaded).predict(calibration_x).ood_score
    assert meta.drift_reference.score_quantiles[0] == pytest.approx(graph_scores.min())
    assert meta.drift_reference.score_quantiles[-1] == pytest.approx(graph_scores.max())
    assert np.mean(graph_scores <= meta.threshold) >= 0.95
    # the score's parts are named in the metadata and come out of the graph beside it
    assert meta.ood_components == detector.component_names()
    components = Predictor(loaded).session.run([COMPONENTS_OUTPUT], {INPUT_NAME: calibration_x[:20].astype(np.float32)})[0]
    assert components.shape == (20, len(meta.ood_components))


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_matches_torch_and_the_numpy_reference(name, run, network, test_inputs):
    model, _, bundle = run
    detector = build_detector(name, bundle).fit(bundle)
    graph = finish_graph(_copy(network), detector)
    session = open_session(graph.SerializeToString(), provider="cpu")
    id_data, noise, inverted = test_inputs
    results = check_parity(session, model, detector, np.concatenate([id_data.x, noise]))  # raises on mismatch
    assert all(r.worst_ratio < 0.5 for r in results), [r.describe() for r in results]
    # The ranking is the reference's: AUROC of ID vs unseen OOD.
    reference, graph_scores = {}, {}
    for key, x in (("id", id_data.x), ("ood", inverted)):
        reference[key] = detector.score(torch_outputs(model, x, detector.layers))
        graph_scores[key] = run_batched(session, x, ["ood_score"])[0]
        compare_scores(name, reference[key], graph_scores[key], width=model.feature_dim)
    # Only pairs the float32 error could reorder may swap: those closer than twice the largest error seen.
    error = max(float(np.abs(graph_scores[k] - reference[k]).max()) for k in reference)
    near_ties = int((np.abs(reference["id"][:, None] - reference["ood"][None, :]) <= 2 * error).sum())
    pairs = len(reference["id"]) * len(reference["ood"])
    swapped = abs(auroc(reference["id"], reference["ood"]) - auroc(graph_scores["id"], graph_scores["ood"])) * pairs
    assert swapped <= near_ties + 1e-6, (swapped, near_ties)


def _copy(proto):
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(proto)
    return duplicate


def test_a_graph_that_differs_from_torch_or_the_reference_fails_the_check(run, network):
    model, _, bundle = run
    detector = build_detector("etf", bundle).fit(bundle)
    session = open_session(finish_graph(_copy(network), detector).SerializeToString(), provider="cpu")
    x = parity_inputs(load_dataset("digits:test").x[:64])
    check_parity(session, model, detector, x)  # the real pair passes
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        other_model.classifier.bias[0] += 0.05  # not the network that was exported
    with pytest.raises(ModelError, match="parity check failed for the logits"):
        check_parity(session, other_model, detector, x)
    arrays = bundle.layers["detection"].to_arrays()
    arrays["means"] = arrays["means"] + 0.01  # class means slightly off: not the statistics in the graph
    other_detector = make_detector("etf", layer="detection").fit(ClassStatistics.from_arrays(arrays))
    with pytest.raises(ModelError, match="parity check failed for the 'etf' OOD score"):
        check_parity(session, model, other_detector, x)


def test_batch_of_1_and_257_agree_with_item_by_item(digits_model_path, test_inputs):
    id_data, noise, _ = test_inputs
    x = np.concatenate([id_data.x[:200], noise[:57]])
    assert len(x) == 257
    predictor = Predictor(digits_model_path, provider="cpu")
    whole = predictor.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    one_by_one = [predictor.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i : i + 1]}) for i in range(len(x))]
    for k, name in enumerate(OUTPUT_NAMES):
        single = np.concatenate([outputs[k] for outputs in one_by_one])
        assert whole[k].shape[0] == 257 and single.shape == whole[k].shape, name
        # The default score's low-rank DDU part computes its residual as a difference of float32 squares
        # scaled by 1 / s_c (ncguard/scores/ddu_lowrank.py), and ONNX Runtime's GEMM sums in another order
        # at another batch size: up to ~1e-5 of a standardized score (the ID spread is ~1) moves.
        atol = 2e-5 if name.startswith("ood") else 1e-6
        np.testing.assert_allclose(whole[k], single, rtol=1e-5, atol=atol, err_msg=name)
    assert np.array_equal(whole[1].argmax(axis=1), np.concatenate([o[1] for o in one_by_one]).argmax(axis=1))


def test_the_threshold_separates_unseen_ood_inputs(digits_model_path, test_inputs):
    """In-distribution test digits pass; uniform noise and inverted digits (never seen) are flagged."""
    id_data, noise, inverted = test_inputs
    predictor = Predictor(digits_model_path)
    id_result = predictor.predict(id_data.x)
    assert np.mean(id_result.class_index == id_data.y) > 0.95
    assert np.mean(~id_result.is_ood) > 0.85  # the threshold keeps 95% of held-out ID data; 450 test digits vary
    for what, x in (("uniform noise", noise), ("inverted digits", inverted)):
        ood_result = predictor.predict(x)
        flagged = np.mean(ood_result.is_ood)
        assert flagged > 0.6, f"only {flagged:.0%} of {what} flagged"  # most of them, at a threshold set on ID data only
        assert auroc(id_result.ood_score, ood_result.ood_score) > 0.9


def test_train_export_predict_end_to_end(digits_model_path, tmp_path, capsys):
    from PIL import Image

    from ncguard.cli.predict import run as predict

    id_data = load_dataset("digits:test")
    image = tmp_path / "digit.png"
    Image.fromarray(np.round(id_data.x[0, 0] * 255).astype(np.uint8)).resize((32, 32), Image.Resampling.NEAREST).save(image)
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, x=np.stack([id_data.x[1], 1.0 - id_data.x[1]]), kind=np.array(["digit", "inverted"]))
    assert predict(argparse.Namespace(model=str(digits_model_path), files=[str(image), str(mixed)], json=True, provider="cpu")) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [r["label"] for r in rows[:2]] == [str(id_data.y[0]), str(id_data.y[1])]
    assert rows[2]["kind"] == "inverted"
    # decisions are the exported model's own (which single digit falls past a 95% threshold varies
    # with training; separation rates are asserted in the test above)
    predictor = Predictor(digits_model_path)
    direct = predictor.predict(np.stack([id_data.x[1], 1.0 - id_data.x[1]]))  # the npz rows, as given
    assert [r["is_ood"] for r in rows[1:]] == direct.is_ood.tolist()
    np.testing.assert_allclose([r["ood_score"] for r in rows[1:]], direct.ood_score, rtol=1e-5, atol=1e-6)
    assert rows[0]["is_ood"] == (rows[0]["ood_score"] > predictor.metadata.threshold)  # the PNG, resized back to 8x8
    assert rows[2]["ood_score"] > rows[1]["ood_score"]  # the inverted digit looks less familiar than the digit


def test_evaluate_all_scores_agrees_with_the_exported_score(digits_model_path, digits_run_dir, tmp_path, capsys):
    from ncguard.cli.evaluate import run as evaluate

    args = argparse.Namespace(
        model=str(digits_model_path), id="digits:test", ood=["noise:uniform", "inverted:digits:test"],
        out_dir=str(tmp_path), all_scores=str(digits_run_dir), provider="cpu",
    )
    assert evaluate(args) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    every = report["all_scores"]
    assert set(every["scores"]) | set(every["skipped"]) == set(SCORES) | {"fused"} and not every["skipped"]
    assert every["scores"]["fused"]["noise:uniform"]["auroc"] > 0.95  # the run has conv-block statistics to fuse
    exported = report["model"]["score"]
    for ood in args.ood:
        assert every["scores"][exported][ood]["auroc"] == pytest.approx(report["ood"][ood]["auroc"], abs=1e-3)
        assert report["ood"][ood]["auroc"] > 0.9
    assert "mahalanobis / inverted:digits:test" in capsys.readouterr().out


def test_export_of_a_logit_score_and_cli_errors(digits_run_dir, tmp_path, capsys):
    args = argparse.Namespace(run_dir=str(digits_run_dir), out=str(tmp_path / "energy.onnx"), score="energy", tpr=0.9, provider="cpu", bentoml=None)
    assert run_export(args) == 0
    assert "parity: the 'energy' OOD score" in capsys.readouterr().out
    meta = load_model(tmp_path / "energy.onnx").metadata
    assert (meta.score, meta.tpr, meta.extra["score_layer"]) == ("energy", 0.9, None)
    with pytest.raises(ConfigError, match="unknown score 'nope'"):
        export_run(str(digits_run_dir), str(tmp_path / "x.onnx"), score="nope")
    with pytest.raises(ConfigError, match="--tpr"):
        export_run(str(digits_run_dir), str(tmp_path / "x.onnx"), tpr=1.5)
    with pytest.raises(ConfigError, match="should end in .onnx"):
        run_export(argparse.Namespace(**{**vars(args), "out": str(tmp_path / "model.bin")}))
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(ConfigError, match="CUDA provider was requested"):
            export_run(str(digits_run_dir), str(tmp_path / "x.onnx"), provider="cuda")
    with pytest.raises(ConfigError, match="unknown provider 'tpu'"):
        export_run(str(digits_run_dir), str(tmp_path / "x.onnx"), provider="tpu")
    with pytest.raises(ModelError, match="run directory not found"):
        export_run(str(tmp_path / "no-run"), str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()


def test_export_defaults_to_the_runs_score_and_tpr(digits_run_dir, tmp_path):
    """A run trained with another --tpr (and score) keeps them through `ncguard export` without flags."""
    run_copy = tmp_path / "run"
    shutil.copytree(digits_run_dir, run_copy)
    config = json.loads((run_copy / "config.json").read_text())
    config["settings"].update(score="energy", tpr=0.9)
    (run_copy / "config.json").write_text(json.dumps(config))
    path, report = export_run(str(run_copy), str(tmp_path / "run.onnx"), provider="cpu")
    meta = load_model(path).metadata
    assert (meta.score, meta.tpr, report.score) == ("energy", 0.9, "energy")


def test_bentoml_flag_stores_the_file_the_service_loads(digits_run_dir, tmp_path):
    """In a subprocess, so BENTOML_HOME points at a fresh store before bentoml is imported."""
    script = (
        "import argparse, bentoml\n"
        "from export.cli import run_export\n"
        f"run_export(argparse.Namespace(run_dir={str(digits_run_dir)!r}, out={str(tmp_path / 'm.onnx')!r}, score='msp', "
        "tpr=0.95, provider='cpu', bentoml='digits-test'))\n"
        "print('STORED', bentoml.models.get('digits-test:latest').path_of('model.onnx'))\n"
    )
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stored = Path(done.stdout.split("STORED ")[-1].strip())
    assert stored.read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert load_model(stored).metadata.score == "msp"


def test_a_run_with_a_block_grid_exports_its_grid_statistics_with_parity(tmp_path, test_inputs):
    """The grid means (ncguard.pooling.block_statistics) reach the graph through the torch exporter: the
    export's own parity check holds the default `fused` score to the NumPy reference on them, and the
    file scores a batch as it scores its rows one by one."""
    from export.run import export_run
    from training.train import TrainOptions, train

    run_dir = tmp_path / "run"
    train(TrainOptions(data="digits", out=str(run_dir), epochs=2, block_grid=2, quiet=True).validated())
    model, _, bundle = load_run(run_dir)
    assert model.block_grid == 2 and bundle.layers["block3"].means_.shape[1] == 6 * model.backbone.block3[-1][0].out_channels
    path, _ = export_run(str(run_dir), str(tmp_path / "grid.onnx"))  # raises if the graph and the reference disagree
    id_data, noise, _ = test_inputs
    x = np.concatenate([id_data.x[:20], noise[:12]])
    session = Predictor(path, provider="cpu").session
    whole = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    single = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i : i + 1]}) for i in range(len(x))]
    for k, name in enumerate(OUTPUT_NAMES):
        np.testing.assert_allclose(whole[k], np.concatenate([s[k] for s in single]), rtol=1e-5, atol=2e-5 if name.startswith("ood") else 1e-6, err_msg=name)
