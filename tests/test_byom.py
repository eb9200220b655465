"""Bring your own model: a plain torch classifier, exported to ONNX with nothing of ncguard inside,
wrapped by the real `ncguard fit` (with torch blocked), then served.

Checks that the wrapped model keeps the original's logits, that its OOD scores and threshold match
the NumPy reference fitted independently on torch's own penultimate features, and that the service
answers as the local Predictor does.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.parity import compare_scores
from ncguard.calibration import calibrate_threshold, split_for_calibration
from ncguard.cli import main
from ncguard.data import load_dataset
from ncguard.model_file import COMPONENTS_OUTPUT, INPUT_NAME, OUTPUT_NAMES, load_model
from ncguard.runtime import Predictor
from ncguard.scores import build_detector
from ncguard.stats import ClassStatistics, StatisticsBundle
from tests.test_torch_free import BLOCK_TORCH

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 12  # a few seconds on digits; ~97% test accuracy


class PlainClassifier(torch.nn.Module):
    """What a user might already have: conv -> pool -> fc -> relu -> fc, trained with cross-entropy."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.hidden = torch.nn.Linear(16 * 4 * 4, 48)
        self.out = torch.nn.Linear(48, n_classes)

    def penultimate(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return torch.relu(self.hidden(h))

    def forward(self, x):
        return self.out(self.penultimate(x))


def train_plain_classifier(x: np.ndarray, y: np.ndarray) -> PlainClassifier:
    torch.manual_seed(0)
    model = PlainClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        permutation = torch.randperm(len(inputs), generator=order)
        for start in range(0, len(inputs), 64):
            batch = permutation[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


def export_plain(model: torch.nn.Module, path: Path) -> Path:
    """torch.onnx's dynamo exporter, user-style names, a dynamic batch axis; nothing of ncguard."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.zeros(2, 1, 8, 8),), dynamo=True, input_names=["pixels"], output_names=["scores"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, external_data=False, verbose=False,
        )
    onnx.save(program.model_proto, str(path))
    return path


def run_blocked_cli(*argv: str) -> subprocess.CompletedProcess:
    """The real `ncguard` command line in a fresh interpreter where importing torch fails."""
    code = BLOCK_TORCH + f"from ncguard.cli import main\nsys.exit(main({list(argv)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def ort_outputs(path: Path, x: np.ndarray, input_name: str, outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(outputs, {input_name: x.astype(np.float32)})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits:train"), load_dataset("digits:test")


@pytest.fixture(scope="module")
def plain(digits, tmp_path_factory):
    """(torch model, its ONNX file) trained on digits:train."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, _ = digits
    model = train_plain_classifier(train.x, train.y)
    return model, export_plain(model, tmp_path_factory.mktemp("plain") / "plain.onnx")


@pytest.fixture(scope="module")
def wrapped(plain, tmp_path_factory):
    """`ncguard fit plain.onnx --features relu_1 --data digits --out wrapped.onnx`, torch blocked."""
    _, source = plain
    out = tmp_path_factory.mktemp("wrapped") / "wrapped.onnx"
    result = run_blocked_cli("fit", str(source), "--features", "relu_1", "--data", "digits", "--out", str(out), "--provider", "cpu")
    assert result.returncode == 0, result.stderr
    return out, result


MULTI_FEATURES = ("relu", "max_pool2d", "relu_1")  # an early block [N, 16, 8, 8], a late one [N, 16, 4, 4], the penultimate layer


@pytest.fixture(scope="module")
def wrapped_multi(plain, tmp_path_factory):
    """`ncguard fit plain.onnx --features relu,max_pool2d,relu_1 --data digits --out multi.onnx`, torch blocked."""
    _, source = plain
    out = tmp_path_factory.mktemp("multi") / "multi.onnx"
    result = run_blocked_cli("fit", str(source), "--features", ",".join(MULTI_FEATURES), "--data", "digits", "--out", str(out), "--provider", "cpu")
    assert result.returncode == 0, result.stderr
    return out, result


def torch_layers(model: PlainClassifier, x: np.ndarray) -> dict[str, np.ndarray]:
    """The three tensors as torch computes them, feature maps pooled by plain NumPy (float64, two-pass
    mean and std): a reference independent of ncguard.pooling's one-pass formula."""
    with torch.no_grad():
        relu = torch.relu(model.conv(torch.from_numpy(x)))
        pooled = torch.nn.functional.max_pool2d(relu, 2)
        penultimate = model.penultimate(torch.from_numpy(x))

    def mean_std(maps):
        flat = maps.numpy().astype(np.float64).reshape(len(maps), maps.shape[1], -1)
        return np.concatenate([flat.mean(axis=2), flat.std(axis=2)], axis=1)

    return {"block1": mean_std(relu), "block2": mean_std(pooled), "transfer": penultimate.numpy().astype(np.float64)}


def test_multi_layer_fit_defaults_to_fused_on_pooled_blocks(wrapped_multi):
    path, result = wrapped_multi
    meta = load_model(path).metadata
    assert meta.score == "fused"  # ncguard.scores.defaults: foreign-multi
    assert meta.ood_components == ["block1:mahalanobis", "block2:mahalanobis", "transfer:ddu-lowrank"]
    layers = meta.extra["feature_layers"]
    assert layers == {
        "block1": {"tensor": "relu", "width": 32, "pooled": True},
        "block2": {"tensor": "max_pool2d", "width": 32, "pooled": True},
        "transfer": {"tensor": "relu_1", "width": 48, "pooled": False},
    }
    assert meta.extra["features_tensor"] == "relu_1" and meta.extra["score_layer"] == ["block1", "block2", "transfer"]
    assert "per-channel mean and std" in result.stdout and "parity: the 'fused' OOD score" in result.stdout
    assert len(meta.drift_reference.feature_mean) == 48  # the `features` output is still the penultimate layer


def test_multi_layer_scores_and_threshold_match_the_numpy_reference_on_torch_features(plain, wrapped_multi, digits):
    """In-graph pooling and the fused graph against a fused detector fitted on torch's own tensors."""
    model, _ = plain
    path, _ = wrapped_multi
    train, test = digits
    train_layers, test_layers = torch_layers(model, train.x), torch_layers(model, test.x)
    fit_index, calibration_index = split_for_calibration(len(train), 0.1, 0)
    stats = {layer: ClassStatistics(10, seed=0).fit(values[fit_index], train.y[fit_index]) for layer, values in train_layers.items()}
    bundle = StatisticsBundle(stats, classes=train.classes, meta={"classifier_layer": "transfer"})
    held_out = {layer: values[calibration_index] for layer, values in train_layers.items()}
    # every named block is scored (block1, block2), then DDU on the penultimate layer
    components = (("block1", "mahalanobis"), ("block2", "mahalanobis"), ("transfer", "ddu"))
    detector = build_detector("fused", bundle, components=components).fit(bundle, held_out)

    predictor = Predictor(path, provider="cpu")
    result = predictor.predict(test.x)
    features, = ort_outputs(path, test.x, INPUT_NAME, ["features"])
    np.testing.assert_allclose(features, test_layers["transfer"], rtol=1e-5, atol=1e-5)
    compare_scores("fused", detector.score(test_layers), result.ood_score)  # raises outside the float32 tolerance
    threshold = calibrate_threshold(detector.score(held_out), 0.95)
    assert predictor.metadata.threshold == pytest.approx(threshold, rel=1e-3, abs=1e-3)


def test_fit_writes_a_model_with_the_export_contract(wrapped):
    path, result = wrapped
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # one self-contained file
    loaded = load_model(path)  # checksum and metadata verified
    graph = loaded.proto.graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == [*OUTPUT_NAMES, COMPONENTS_OUTPUT]
    meta = loaded.metadata
    assert meta.classes == [str(c) for c in range(10)]
    assert meta.input_shape == [1, 8, 8] and meta.input_scale == 16.0
    assert meta.score == "knn" and meta.tpr == 0.95
    assert meta.extra["features_tensor"] == "relu_1" and meta.extra["logits_tensor"] == "scores"
    assert meta.extra["classifier_recovered"] is True  # relu_1 feeds the final Gemm: the logits are affine in it
    assert "wrote" in result.stdout and "parity" in result.stdout


def test_wrapped_logits_equal_the_original(plain, wrapped, digits):
    _, source = plain
    path, _ = wrapped
    _, test = digits
    (original,) = ort_outputs(source, test.x, "pixels", ["scores"])
    logits, probabilities, features = ort_outputs(path, test.x, INPUT_NAME, ["logits", "probabilities", "features"])
    np.testing.assert_allclose(logits, original, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(logits.argmax(axis=1), original.argmax(axis=1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert features.shape == (len(test), 48)
    assert (logits.argmax(axis=1) == test.y).mean() > 0.9  # the user's model, unchanged, still classifies


def test_scores_and_threshold_match_the_numpy_reference_on_torch_features(plain, wrapped, digits):
    """The reference is fitted from torch's penultimate activations, not from anything ncguard computed."""
    model, _ = plain
    path, _ = wrapped
    train, test = digits
    with torch.no_grad():
        train_features = model.penultimate(torch.from_numpy(train.x)).numpy()
        test_features = model.penultimate(torch.from_numpy(test.x)).numpy()
    fit_index, calibration_index = split_for_calibration(len(train), 0.1, 0)
    stats = ClassStatistics(10, per_class_covariance=False, seed=0).fit(train_features[fit_index], train.y[fit_index])
    bundle = StatisticsBundle({"transfer": stats}, classes=train.classes)
    detector = build_detector("knn", bundle).fit(bundle)

    predictor = Predictor(path, provider="cpu")
    result = predictor.predict(test.x)
    reference = detector.score(features=test_features)
    compare_scores("knn", reference, result.ood_score, width=48)  # raises when outside the float32 tolerance
    threshold = calibrate_threshold(detector.score(features=train_features[calibration_index]), 0.95)
    assert predictor.metadata.threshold == pytest.approx(threshold, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("model", ["wrapped", "wrapped_multi"])
def test_wrapped_model_flags_ood_inputs(model, digits, request):
    from ncguard.ood_data import load_ood_dataset
    from ncguard.ood_metrics import auroc

    path, _ = request.getfixturevalue(model)
    _, test = digits
    predictor = Predictor(path, provider="cpu")
    id_scores = predictor.predict(test.x).ood_score
    for spec in ("noise:uniform", "inverted:digits:test"):
        ood_scores = predictor.predict(load_ood_dataset(spec, test).x).ood_score
        assert auroc(id_scores, ood_scores) > 0.9, spec


def test_wrapped_model_serves_like_the_local_predictor(wrapped, digits, tmp_path):
    from ncguard.client import local_server

    path, _ = wrapped
    _, test = digits
    rng = np.random.default_rng(0)
    x = np.concatenate([test.x[:20], rng.random((12, 1, 8, 8), dtype=np.float32)])
    expected = Predictor(path, provider="cpu").predict(x)
    with local_server(path, env={"BENTOML_HOME": str(tmp_path / "bentoml")}) as client:
        answer = client.predict(x)
        info = client.model_info()
    np.testing.assert_array_equal(answer.class_index, expected.class_index)
    np.testing.assert_allclose(answer.ood_score, expected.ood_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(answer.is_ood, expected.is_ood)
    assert answer.is_ood[20:].all() and not answer.is_ood[:20].all()
    assert info["score"] == "knn" and info["input_shape"] == [1, 8, 8]


def test_inspect_lists_the_penultimate_tensor_and_suggests_it(plain, capsys):
    _, source = plain
    assert main(["inspect", str(source), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in document["inputs"]] == ["pixels"]
    assert document["suggested_logits"] == "scores"
    assert document["suggested_features"] == "relu_1"
    by_name = {t["name"]: t for t in document["candidates"]}
    assert by_name["relu_1"]["shape"][1:] == [48] and by_name["relu_1"]["op"] == "Relu"
    # a feature map [N, 16, 4, 4] is a candidate read through its per-channel mean and std: 2 x 16 wide
    assert by_name["max_pool2d"]["pooled"] and by_name["max_pool2d"]["width"] == 32 and not by_name["relu_1"]["pooled"]
    # the multi-layer set: the first block output (relu, 8x8), the last (max_pool2d, 4x4), the penultimate layer
    assert document["suggested_feature_set"] == ["relu", "max_pool2d", "relu_1"]
    assert main(["inspect", str(source)]) == 0
    table = capsys.readouterr().out
    assert "32 (pooled)" in table and "--features relu,max_pool2d,relu_1" in table and "suggested set #2" in table


def fit_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["fit", *argv])
    return code, capsys.readouterr().err


def test_fit_errors_name_the_problem(plain, tmp_path, capsys):
    _, source = plain
    out = str(tmp_path / "out.onnx")
    base = [str(source), "--data", "digits", "--out", out]

    code, err = fit_cli(capsys, *base, "--features", "relu1")
    assert code == 2 and "no tensor or node of that name" in err and "relu_1" in err  # close names suggested

    code, err = fit_cli(capsys, *base, "--features", "relu_1,relu_1")
    assert code == 2 and "names relu_1 more than once" in err

    code, err = fit_cli(capsys, *base, "--features", "relu,,relu_1")
    assert code == 2 and "--features needs tensor names" in err

    code, err = fit_cli(capsys, *base, "--features", "node_relu_1", "--logits", "nothing_like_it")
    assert code == 2 and "--logits 'nothing_like_it'" in err

    rng = np.random.default_rng(0)
    vectors = tmp_path / "vectors.npz"
    np.savez(vectors, x=rng.random((40, 64), dtype=np.float32), y=np.arange(40) % 10)
    code, err = fit_cli(capsys, str(source), "--features", "relu_1", "--data", str(vectors), "--out", out)
    assert code == 2 and "gives inputs of shape [N, 64]" in err and "[batch, 1, 8, 8]" in err

    twelve = tmp_path / "twelve.npz"
    np.savez(twelve, x=rng.random((48, 1, 8, 8), dtype=np.float32), y=np.arange(48) % 12)
    code, err = fit_cli(capsys, str(source), "--features", "relu_1", "--data", str(twelve), "--out", out)
    assert code == 2 and "has 12 classes" in err and "'10', '11'" in err and "not among the model's outputs" in err

    code, err = fit_cli(capsys, *base, "--features", "view", "--score", "vim")
    assert code == 2 and "not an affine function of --features 'view'" in err

    assert not Path(out).exists()


# ---------------------------------------------------------------------- hand-built graphs (no training)


def linear_graph(weight: np.ndarray, *, input_name="pixels", hidden_name="hidden", output_name="scores", opset=18,
                 input_type=onnx.TensorProto.FLOAT, batch="batch", softmax=False) -> onnx.ModelProto:
    """input [batch, 1, 8, 8] -> Flatten -> hidden = x @ W -> output (optionally through Softmax)."""
    from onnx import helper, numpy_helper

    nodes = []
    x = input_name
    if input_type != onnx.TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["as_float"], to=onnx.TensorProto.FLOAT))
        x = "as_float"
    nodes += [
        helper.make_node("Flatten", [x], ["flat"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["flat", "W"], [hidden_name], name="classifier"),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", [hidden_name], [output_name], axis=1, name="final_softmax"))
    else:
        nodes.append(helper.make_node("Identity", [hidden_name], [output_name], name="out"))
    graph = helper.make_graph(
        nodes, "user_model",
        [helper.make_tensor_value_info(input_name, input_type, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, [batch, weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def digits_weight(digits):
    """A least-squares linear classifier on the digits' pixels: a usable model with no training loop."""
    train, _ = digits
    targets = np.eye(10)[train.y]
    return np.linalg.lstsq(train.x.reshape(len(train), -1), targets, rcond=None)[0]


def fit_graph(model: onnx.ModelProto, data, **options):
    from export.byom import fit_existing_model

    return fit_existing_model(model, data, provider="cpu", **options)


def run_graph(model: onnx.ModelProto, x: np.ndarray, input_name: str, outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {input_name: x})


def test_contract_names_already_in_the_model_are_renamed_not_clobbered(digits_weight, digits, tmp_path):
    train, test = digits
    source = linear_graph(digits_weight, input_name="input", hidden_name="features", output_name="logits")
    proto, report = fit_graph(source, train, features="features", score="mahalanobis")
    assert [o.name for o in proto.graph.output] == [*OUTPUT_NAMES, COMPONENTS_OUTPUT]
    (original,) = run_graph(source, test.x, "input", ["logits"])
    logits, features = run_graph(proto, test.x, INPUT_NAME, ["logits", "features"])
    np.testing.assert_allclose(logits, original, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(features, original, rtol=1e-6, atol=1e-6)  # features named the logits' tensor here
    assert report.classifier_recovered  # logits = 1 * features: exactly affine
    assert saved_and_loaded(proto, tmp_path).metadata.extra["logits_tensor"] == "logits"


def test_softmax_output_gives_its_input_as_logits_and_the_same_probabilities(digits_weight, digits):
    """The same probabilities up to the fitted temperature: softmax(logits / T) (ncguard.temperature)."""
    from ncguard.temperature import softmax

    train, test = digits
    source = linear_graph(digits_weight, softmax=True)
    proto, report = fit_graph(source, train, features="flat", score="energy")
    assert any("Softmax" in note for note in report.notes)
    assert report.layer is None  # energy reads the logits only
    (original,) = run_graph(source, test.x, "pixels", ["scores"])
    probabilities, logits = run_graph(proto, test.x, INPUT_NAME, ["probabilities", "logits"])
    original_logits = np.log(np.maximum(original.astype(np.float64), 1e-30))  # up to a constant per row
    np.testing.assert_allclose(probabilities, softmax(original_logits, report.temperature), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), original.argmax(axis=1))
    assert not np.allclose(logits.sum(axis=1), 1.0)  # real logits, not probabilities
    assert "final_softmax" not in {n.name for n in proto.graph.node}  # the original softmax is pruned away


def test_input_scale_feeds_the_model_what_it_expects(digits_weight, digits, tmp_path):
    """A uint8 model of 0-255 pixels, fed the readers' [0, 1] data through --input-scale 255."""
    train, test = digits
    source = linear_graph(digits_weight / 255.0, input_type=onnx.TensorProto.UINT8)
    proto, _ = fit_graph(source, train, features="flat", transform=_transform(scale=255.0), score="etf")
    raw = np.clip(np.round(test.x * 255.0), 0, 255).astype(np.uint8)
    (original,) = run_graph(source, raw, "pixels", ["scores"])
    (logits,) = run_graph(proto, test.x, INPUT_NAME, ["logits"])
    np.testing.assert_allclose(logits, original, rtol=1e-5, atol=1e-5)
    assert saved_and_loaded(proto, tmp_path).metadata.extra["input_transform"]["scale"] == 255.0


def test_mean_and_std_are_applied_per_channel(digits_weight, digits):
    train, test = digits
    source = linear_graph(digits_weight)
    proto, _ = fit_graph(source, train, features="flat", transform=_transform(mean=(0.5,), std=(0.25,)), score="maxlogit")
    (original,) = run_graph(source, (test.x - 0.5) / 0.25, "pixels", ["scores"])
    (logits,) = run_graph(proto, test.x, INPUT_NAME, ["logits"])
    np.testing.assert_allclose(logits, original, rtol=1e-5, atol=1e-5)


def test_old_opset_is_converted(digits_weight, digits, tmp_path):
    train, _ = digits
    proto, report = fit_graph(linear_graph(digits_weight, opset=11), train, features="flat", score="etf")
    assert any("opset 11" in note for note in report.notes)
    assert saved_and_loaded(proto, tmp_path).metadata.score == "etf"


def test_a_one_dimensional_feature_map_is_pooled_in_graph_beside_a_flat_layer(digits_weight, digits, tmp_path):
    """A hand-built graph (no torch): the 8x8 digit read as an [N, C=8, L=8] sequence map, then the linear
    classifier. `--features rows,flat` gives block1 = its per-channel mean and std and the default fused
    score; finish_model's parity check holds the in-graph pooling to the NumPy one."""
    from onnx import helper, numpy_helper

    train, test = digits
    source = linear_graph(digits_weight)
    graph = source.graph
    graph.initializer.append(numpy_helper.from_array(np.array([0, 8, 8], dtype=np.int64), "rows_shape"))
    graph.node.insert(0, helper.make_node("Reshape", ["pixels", "rows_shape"], ["rows"], name="as_rows"))
    proto, report = fit_graph(source, train, features="rows,flat")
    assert report.score == "fused" and report.layers["block1"] == {"tensor": "rows", "width": 16, "pooled": True}
    assert report.layers["transfer"] == {"tensor": "flat", "width": 64, "pooled": False}
    loaded = saved_and_loaded(proto, tmp_path)
    assert loaded.metadata.ood_components == ["block1:mahalanobis", "transfer:ddu-lowrank"]
    (features,) = run_graph(proto, test.x, INPUT_NAME, ["features"])
    np.testing.assert_allclose(features, test.x.reshape(len(test), -1), rtol=1e-6, atol=1e-6)
    assert any("'mahalanobis' OOD score" in line for line in report.describe())  # the pooled block's part, checked


def test_model_errors_for_unusable_graphs(digits_weight, digits):
    from onnx import helper

    from ncguard.errors import ModelError

    train, _ = digits
    with pytest.raises(ModelError, match="fixed batch size of 1"):
        fit_graph(linear_graph(digits_weight, batch=1), train, features="flat")
    no_logits = linear_graph(digits_weight)
    no_logits.graph.node.append(helper.make_node("ArgMax", ["hidden"], ["label"], axis=1, keepdims=0))
    del no_logits.graph.output[:]
    no_logits.graph.output.append(helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["batch"]))
    with pytest.raises(ModelError, match="no logits-like output"):
        fit_graph(no_logits, train, features="flat")
    with pytest.raises(ModelError, match="has width 1"):  # an explicit --logits that is one column wide
        narrow = linear_graph(digits_weight[:, :1])
        fit_graph(narrow, train, features="flat", logits="scores")


def _transform(**values):
    from export.graph_surgery import InputTransform

    return InputTransform(**values)


def saved_and_loaded(proto: onnx.ModelProto, folder: Path):
    """Through the same checks every consumer applies (onnx checker on save, checksum on load)."""
    from ncguard.model_file import save_model

    return load_model(save_model(proto, folder / "model.onnx"))


# ---------------------------------------------------------------------- small pieces


@pytest.mark.parametrize(
    "shape, width",
    [(["N", 512], 512), (["N", 512, 1, 1], 512), (["N", 1, 7], 7), ([4, 3], 3), (["N", None], None), (["N", "d"], None)],
)
def test_flattening_rule_accepts_one_long_axis(shape, width):
    from export.graph_reading import matrix_width

    assert matrix_width(shape) == width


@pytest.mark.parametrize("shape, rows, reason", [
    (["N"], None, "1 axis"),
    (["N", 64, 7, 7], None, "more than one axis"),
    ([1, 640], 10, "not the batch axis"),
])
def test_flattening_rule_refuses_feature_maps_and_missing_batch_axes(shape, rows, reason):
    from export.graph_reading import matrix_width

    with pytest.raises(ValueError, match=reason):
        matrix_width(shape, rows=rows)


@pytest.mark.parametrize("shape, expected", [
    (["N", 64, 7, 7], (128, True)), (["N", 8, 30], (16, True)), (["N", 512, 1, 1], (512, False)), (["N", 1, 7], (7, False)),
])
def test_features_layers_pool_feature_maps_and_flatten_the_rest(shape, expected):
    from export.graph_reading import layer_width

    assert layer_width(shape) == expected


@pytest.mark.parametrize("shape, rows, reason", [
    (["N", 2, 3, 4, 5], None, "feature maps are taken with 3 or 4 axes"),
    ([1, 64, 7, 7], 10, "not the batch axis"),
])
def test_features_layers_refuse_other_shapes(shape, rows, reason):
    from export.graph_reading import layer_width

    with pytest.raises(ValueError, match=reason):
        layer_width(shape, rows=rows)


def test_a_foreign_model_read_at_several_tensors_defaults_to_fused():
    from ncguard.scores.defaults import FOREIGN, FOREIGN_MULTI, default_score

    assert default_score(FOREIGN) == "knn" and default_score(FOREIGN_MULTI) == "fused"


def test_linear_readout_recovers_an_affine_classifier_and_rejects_a_curved_one():
    from export.byom import LinearReadout

    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 6)).astype(np.float32)
    weight, bias = rng.normal(size=(4, 6)), rng.normal(size=4)
    logits = (features @ weight.T + bias).astype(np.float32)
    readout = LinearReadout()
    for start in range(0, 400, 64):  # streamed in chunks
        readout.partial_fit(features[start : start + 64][: 400 - start], logits[start : start + 64][: 400 - start])
    readout.finalize()
    np.testing.assert_allclose(readout.weight_, weight, rtol=1e-4, atol=1e-4)
    assert readout.worst_ratio(features[400:], logits[400:]) <= 1.0
    curved = LinearReadout().partial_fit(features[:400], np.tanh(logits[:400])).finalize()
    assert curved.worst_ratio(features[400:], np.tanh(logits[400:])) > 1.0
