"""`ncguard train` end to end, the run directory, load_run, `ncguard collapse`, and clear errors."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from ncguard.cli.collapse import run as run_collapse
from ncguard.data import load_dataset
from ncguard.errors import ModelError
from ncguard.ood_metrics import auroc
from ncguard.scores import build_detector, make_detector
from ncguard.stats import StatisticsBundle
from training.cli import main as training_main
from training.inference import collect_layer_features, fit_on_held_out, iter_layer_features
from training.precision import resolve_precision
from training.runs import calibration_inputs, calibration_split, load_run

RUN_FILES = {"config.json", "checkpoint.pt", "model.pt", "statistics.npz", "metrics.json", "collapse.json"}


def ncguard_train(*argv: str) -> int:
    """`ncguard train ARGV` through the real command line once it is wired, else training.cli."""
    from ncguard.cli import COMMANDS, main

    if any(command.name == "train" and command.handler for command in COMMANDS):
        return main(["train", *argv])
    return training_main(list(argv))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A short digits run made through the command line: (run_dir, captured stdout)."""
    run_dir = tmp_path_factory.mktemp("cli-run") / "digits"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "2", "--quiet")
    assert code == 0
    return run_dir, stdout.getvalue()


def features_of(model, x):
    chunks = [f for _, f in iter_layer_features(model, x, ("detection", "logits"))]
    return np.concatenate([c["detection"] for c in chunks]), np.concatenate([c["logits"] for c in chunks])


def test_train_writes_a_complete_run_directory(cli_run):
    run_dir, stdout = cli_run
    assert RUN_FILES <= {path.name for path in run_dir.iterdir()}
    assert not [path for path in run_dir.iterdir() if path.name.endswith(".tmp")]
    assert "test accuracy" in stdout and str(run_dir) in stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["classes"] == [str(d) for d in range(10)]
    assert config["data"]["input_shape"] == [1, 8, 8] and config["data"]["input_scale"] == 16.0
    assert config["settings"]["arch"] == "cnn" and config["settings"]["epochs"] == 2
    assert config["settings"]["augment"] == "shift" and config["settings"]["entropy_weight"] == 0.05
    assert config["settings"]["precision"] == resolve_precision("auto", torch.device("cpu"))  # auto, resolved
    assert {"ncguard", "torch", "numpy", "python"} <= set(config["versions"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(metrics["history"][0])
    assert metrics["test"]["spec"] == "digits:test" and metrics["test"]["n"] == 450
    assert len(metrics["nc1_history"]["transfer"]) == 2
    assert metrics["timings"]["total_seconds"] >= metrics["timings"]["train_seconds"] > 0
    collapse = json.loads((run_dir / "collapse.json").read_text())
    assert set(collapse["layers"]) == {"transfer", "detection"}
    assert collapse["layers"]["detection"]["nc3"] is not None and collapse["layers"]["transfer"]["nc3"] is None


def test_load_run_rebuilds_the_trained_model(cli_run):
    run_dir, _ = cli_run
    model, config, bundle = load_run(run_dir)
    assert not model.training
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert set(bundle.layers) == {"block1", "block2", "block3", "transfer", "detection"}  # the cnn has all default blocks
    assert bundle.meta["run_id"] == config["run_id"] and bundle.meta["score"] == "fused"
    fit_index, calibration_index = calibration_split(config)
    assert len(fit_index) == config["data"]["n_fit"] and len(calibration_index) == config["data"]["n_calibration"]
    assert int(bundle.layers["detection"].counts_.sum()) == len(fit_index)


def test_statistics_give_sensible_scores(digits_run_dir):
    model, config, bundle = load_run(digits_run_dir)
    detector = make_detector("etf").fit(bundle)
    test = load_dataset("digits:test")
    id_features, id_logits = features_of(model, test.x)
    # The bundle's classifier is the model's: it reproduces the logits from z.
    np.testing.assert_allclose(id_features @ bundle.weight.T + bundle.bias, id_logits, atol=1e-4)
    id_scores = detector.score(features=id_features, logits=id_logits)
    noise = np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    ood_features, ood_logits = features_of(model, noise)
    assert auroc(id_scores, detector.score(features=ood_features, logits=ood_logits)) > 0.9
    metrics = json.loads((digits_run_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9


def test_default_score_is_fused_and_training_calibrates_no_threshold(digits_run_dir):
    """The run records its score and TPR for export; the threshold is calibrated by export alone."""
    model, config, bundle = load_run(digits_run_dir)
    assert bundle.meta["score"] == config["settings"]["score"] == "fused"
    assert bundle.meta["tpr"] == config["settings"]["tpr"] == 0.95
    assert "threshold" not in bundle.meta and "calibration" not in json.loads((digits_run_dir / "metrics.json").read_text())
    held_out_x, _ = calibration_inputs(config)
    fused = fit_on_held_out(build_detector(config["settings"]["score"], bundle), bundle, model, held_out_x)
    fused.calibrate(collect_layer_features(model, held_out_x, fused.layers), config["settings"]["tpr"])
    test, noise = load_dataset("digits:test").x, np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    assert np.mean(fused.is_ood(collect_layer_features(model, test, fused.layers))) < 0.2
    assert np.mean(fused.is_ood(collect_layer_features(model, noise, fused.layers))) > 0.9


def test_detection_layer_collapses_more_than_transfer_layer(digits_run_dir):
    collapse = json.loads((digits_run_dir / "collapse.json").read_text())["layers"]
    assert collapse["detection"]["nc1"] < collapse["transfer"]["nc1"]


def test_collapse_command_prints_table_and_writes_png(cli_run, capsys):
    run_dir, _ = cli_run
    assert run_collapse(argparse.Namespace(run_dir=str(run_dir))) == 0
    out = capsys.readouterr().out
    assert "transfer" in out and "detection" in out and "NC1" in out and "NC4" in out
    assert (run_dir / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collapse_command_errors_name_the_problem(tmp_path, cli_run):
    with pytest.raises(ModelError, match="run directory not found"):
        run_collapse(argparse.Namespace(run_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ModelError, match="collapse.json not found"):
        run_collapse(argparse.Namespace(run_dir=str(tmp_path)))
    damaged = tmp_path / "damaged"
    shutil.copytree(cli_run[0], damaged)
    (damaged / "collapse.json").write_text('{"layers": {"transfer": {"nc1": "many"}}}')
    with pytest.raises(ModelError, match="detection"):
        run_collapse(argparse.Namespace(run_dir=str(damaged)))


def test_vectors_train_with_the_mlp(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    x = (rng.normal(size=(3, 20)) * 3)[y] + rng.normal(size=(180, 20))
    np.savez(tmp_path / "vectors.npz", x=x.astype(np.float32), y=y)
    run_dir = tmp_path / "run"
    assert ncguard_train("--data", str(tmp_path / "vectors.npz"), "--out", str(run_dir), "--epochs", "3",
                         "--batch-size", "32", "--layers", "transfer,detection", "--quiet") == 0
    assert "held-out accuracy" in capsys.readouterr().out
    _, config, bundle = load_run(run_dir)
    assert config["settings"]["arch"] == "mlp" and config["settings"]["augment"] == "none"
    assert config["data"]["test_spec"] is None and set(bundle.layers) == {"transfer", "detection"}


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--epochs", "0"], "--epochs must be a whole number >= 1"),
        (["--head", "cosine"], "--head 'cosine' is not one of: etf, plain, l2"),
        (["--arch", "vgg"], "--arch 'vgg' is not one of"),
        (["--loss", "mse"], "--loss 'mse' is not one of"),
        (["--classifier", "frozen"], "--classifier 'frozen' is not one of"),
        (["--augment", "rotate"], "--augment 'rotate' is not one of"),
        (["--lr", "-1"], "--lr must be a number in (0, 1]"),
        (["--lr", "nan"], "--lr must be a number in (0, 1]"),
        (["--batch-size", "1"], "--batch-size must be a whole number >= 2"),
        (["--entropy-weight", "-0.5"], "--entropy-weight must be a finite number >= 0"),
        (["--label-smoothing", "1"], "--label-smoothing must be a number in [0, 1)"),
        (["--tpr", "1.5"], "--tpr must be strictly between 0 and 1"),
        (["--calibration-fraction", "0.9"], "--calibration-fraction must be in (0, 0.5]"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["--precision", "fp16"], "--precision 'fp16' is not one of: auto, fp32, bf16"),
        (["--layers", "block9"], "--layers: block9 not in the cnn model"),
        (["--arch", "mlp", "--augment", "shift-flip", "--data", "vectors"], "needs images"),
        (["--data", "no-such-data"], "unknown data SPEC 'no-such-data'"),
        (["--data", "vectors", "--arch", "cnn"], "use --arch mlp for vectors"),
        (["--data", "one-class"], "training a classifier needs at least 2"),
        (["--resume"], "has no config.json; it is not a run directory"),
    ],
)
def test_bad_flags_and_data_give_clear_errors(flags, message, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "vectors.npz", x=rng.normal(size=(40, 6)).astype(np.float32), y=np.arange(40) % 2)
    np.savez(tmp_path / "one-class.npz", x=rng.normal(size=(40, 6)).astype(np.float32), y=np.zeros(40, dtype=np.int64))
    data = "digits"
    if "--data" in flags:
        index = flags.index("--data")
        name = flags[index + 1]
        data = str(tmp_path / f"{name}.npz") if name in ("vectors", "one-class") else name
        flags = flags[:index] + flags[index + 2:]
    code = ncguard_train("--data", data, "--out", str(tmp_path / "run"), "--quiet", *flags)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_existing_output_and_changed_resume_settings_are_refused(cli_run, tmp_path, capsys):
    run_dir, _ = cli_run
    assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "2", "--quiet") == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert ncguard_train("--data", "digits", "--out", str(copy), "--epochs", "3", "--resume", "--quiet") == 2
    assert "epochs 2 (now 3)" in capsys.readouterr().err


def test_resume_of_a_finished_run_only_redoes_the_fit(cli_run, tmp_path, capsys):
    run_dir, _ = cli_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "model.pt").unlink()  # as if the process died after training, before the run was complete
    with pytest.raises(ModelError, match="training did not finish"):
        load_run(copy)
    assert ncguard_train("--data", "digits", "--out", str(copy), "--epochs", "2", "--resume", "--quiet") == 0
    model, _, _ = load_run(copy)
    original, _, _ = load_run(run_dir)
    for name, value in original.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert json.loads((copy / "metrics.json").read_text())["history"] == json.loads((run_dir / "metrics.json").read_text())["history"]


def test_load_run_errors_name_the_damaged_file(cli_run, tmp_path):
    run_dir, _ = cli_run
    with pytest.raises(ModelError, match="run directory not found"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="not an ncguard run directory"):
        load_run(tmp_path)
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not readable JSON"):
        load_run(damaged)
    shutil.copy(run_dir / "config.json", damaged / "config.json")
    (damaged / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot read .*model.pt"):
        load_run(damaged)
    shutil.copy(run_dir / "model.pt", damaged / "model.pt")
    bundle = StatisticsBundle.load(run_dir / "statistics.npz")
    bundle.meta["run_id"] = "another-run"
    bundle.save(damaged / "statistics.npz")
    with pytest.raises(ModelError, match="belongs to run 'another-run'"):
        load_run(damaged)


def test_collapse_command_runs_without_torch(cli_run):
    import subprocess
    import sys

    from tests.test_torch_free import BLOCK_TORCH

    run_dir, _ = cli_run
    code = BLOCK_TORCH + (
        "import argparse, sys\n"
        "from ncguard.cli.collapse import run\n"
        f"run(argparse.Namespace(run_dir={str(run_dir)!r}))\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NC1" in result.stdout


def test_a_run_from_before_precision_was_recorded_resumes_as_the_fp32_run_it_was(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "2", "--precision", "fp32", "--quiet") == 0
    config = json.loads((run_dir / "config.json").read_text())
    del config["settings"]["precision"]  # written before the setting existed
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "model.pt").unlink()
    if resolve_precision("auto", torch.device("cpu")) == "bf16":  # auto now means bf16: not the run's precision
        assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "2", "--resume", "--quiet") == 2
        assert "precision 'fp32' (now 'bf16')" in capsys.readouterr().err
    assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "2", "--precision", "fp32", "--resume", "--quiet") == 0
    assert (run_dir / "model.pt").is_file()


def test_blocks_are_pooled_on_the_recorded_grid(tmp_path):
    """A run records its block grid, fits its block statistics on it, and load_run rebuilds it."""
    run_dir = tmp_path / "run"
    assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "1", "--block-grid", "2", "--quiet") == 0
    model, config, bundle = load_run(run_dir)
    assert config["settings"]["block_grid"] == 2 == model.block_grid
    channels = model.backbone.block3[-1][0].out_channels
    features = collect_layer_features(model, load_dataset("digits").x[:5], ("block3",))["block3"]
    assert features.shape[1] == bundle.layers["block3"].means_.shape[1] == 6 * channels


def test_a_run_from_before_the_block_grid_was_recorded_keeps_whole_map_statistics(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "1", "--quiet") == 0
    config = json.loads((run_dir / "config.json").read_text())
    del config["settings"]["block_grid"]  # written before the setting existed
    (run_dir / "config.json").write_text(json.dumps(config))
    model, _, bundle = load_run(run_dir)
    x = load_dataset("digits").x[:5]
    features = collect_layer_features(model, x, ("block3",))["block3"]
    assert model.block_grid == 0 and features.shape[1] == bundle.layers["block3"].means_.shape[1] == 2 * model.backbone.block3[-1][0].out_channels
    (run_dir / "model.pt").unlink()
    assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "1", "--block-grid", "2", "--resume", "--quiet") == 2
    assert "block_grid 0 (now 2)" in capsys.readouterr().err
    assert ncguard_train("--data", "digits", "--out", str(run_dir), "--epochs", "1", "--resume", "--quiet") == 0


def test_a_bad_block_grid_is_a_clear_error(tmp_path, capsys):
    assert ncguard_train("--data", "digits", "--out", str(tmp_path / "run"), "--block-grid", "-1", "--quiet") == 2
    assert "--block-grid" in capsys.readouterr().err and not (tmp_path / "run").exists()
