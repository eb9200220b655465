"""The model artifact: metadata round trip, checksum, refusal of tampered or foreign files, runtime."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.model_file import DriftReference, ModelMetadata, load_model, save_model, stamp
from ncguard.runtime import CPU, CUDA, Predictor, select_providers

from . import tiny_models

WEIGHT = np.array([[1.0, -1.0], [-1.0, 1.0], [0.5, 0.5]], dtype=np.float32)  # 2 features -> 3 classes


def tiny_graph() -> onnx.ModelProto:
    """input [N,2] -> logits = x W^T, ood_score = -max logit, features = x."""
    return tiny_models.tiny_graph(WEIGHT, (2,))


def metadata(**overrides) -> ModelMetadata:
    values = dict(
        name="tiny",
        classes=["a", "b", "c"],
        input_shape=[2],
        input_scale=1.0,
        score="maxlogit",
        threshold=-0.5,
        tpr=0.95,
        drift_reference=DriftReference([0.0, 0.5, 1.0], [0.2, 0.3, 0.5], [0.0, 0.0], [1.0, 1.0]),
        statistics_checksum="0" * 64,
    )
    values.update(overrides)
    return ModelMetadata(**values)


@pytest.fixture
def model_path(tmp_path):
    return save_model(stamp(tiny_graph(), metadata()), tmp_path / "tiny.onnx")


def test_metadata_round_trip(model_path):
    loaded = load_model(model_path)
    assert loaded.metadata == metadata()
    assert [p.key for p in loaded.proto.metadata_props if p.key == "ncguard.checksum"]


def test_stamp_keeps_foreign_metadata_and_replaces_its_own():
    model = tiny_graph()
    helper.set_model_props(model, {"author": "someone"})
    stamp(model, metadata(threshold=1.0))
    stamp(model, metadata(threshold=2.0))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["author"] == "someone"
    assert props["ncguard.threshold"] == "2.0"
    assert len(model.metadata_props) == len(props)


def test_tampered_weights_are_refused(model_path):
    model = onnx.load(model_path)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(WEIGHT.T * 2, "weight_t"))
    onnx.save(model, model_path)
    with pytest.raises(ModelError, match="checksum"):
        load_model(model_path)


def test_tampered_threshold_is_refused(model_path):
    model = onnx.load(model_path)
    for prop in model.metadata_props:
        if prop.key == "ncguard.threshold":
            prop.value = "99.0"
    onnx.save(model, model_path)
    with pytest.raises(ModelError, match="checksum"):
        load_model(model_path)


def test_foreign_model_is_refused(tmp_path):
    path = tmp_path / "foreign.onnx"
    onnx.save(tiny_graph(), path)
    with pytest.raises(ModelError, match="not an ncguard model"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"definitely not protobuf \xff\xfe", b"\x08\x07"])
def test_corrupt_or_missing_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError):
        load_model(path)
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "absent.onnx")


def test_invalid_graph_is_not_written(tmp_path):
    model = tiny_graph()
    model.graph.node[1].input[1] = "no_such_tensor"
    with pytest.raises(ModelError, match="invalid ONNX graph"):
        save_model(model, tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


def test_bad_metadata_values_are_refused():
    with pytest.raises(ModelError, match="tpr"):
        metadata(tpr=1.5)
    with pytest.raises(ModelError, match="class priors"):
        metadata(classes=["a", "b"])
    with pytest.raises(ModelError, match="non-decreasing"):
        DriftReference([1.0, 0.0], [1.0], [0.0], [1.0])


def test_predictor_runs_the_graph(model_path):
    predictor = Predictor(model_path, provider="cpu")
    x = np.array([[2.0, 0.0], [0.0, 2.0], [0.1, 0.1]], dtype=np.float32)
    out = predictor.predict(x)
    np.testing.assert_allclose(out.logits, x @ WEIGHT.T, rtol=1e-6)
    np.testing.assert_array_equal(out.class_index, [0, 1, 2])
    np.testing.assert_allclose(out.ood_score, -(x @ WEIGHT.T).max(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(out.is_ood, out.ood_score > -0.5)
    assert predictor.providers_ == [CPU]
    # a single unbatched item is accepted; batching in chunks gives the same answers
    single = predictor.predict(x[0])
    np.testing.assert_allclose(single.logits, out.logits[:1])
    np.testing.assert_allclose(predictor.predict(x, batch_size=1).ood_score, out.ood_score)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3), np.float32), "shape"),
        (np.zeros((0, 2), np.float32), "empty"),
        (np.array([[np.nan, 0.0]], np.float32), "NaN"),
        (np.array([["a", "b"]]), "numbers"),
    ],
)
def test_predictor_rejects_bad_input(model_path, bad, message):
    with pytest.raises(DataError, match=message):
        Predictor(model_path).predict(bad)


def test_rows_that_overflow_the_network_are_named_or_flagged(model_path):
    x = np.array([[1.0, 0.0], [3e38, -3e38], [0.0, 1.0]], dtype=np.float32)  # finite, but x W^T overflows float32
    predictor = Predictor(model_path)
    with pytest.raises(DataError, match="rows 1 drive") as caught:
        predictor.predict(x)
    assert caught.value.reason == "overflow"
    lenient = predictor.predict(x, strict=False)
    assert lenient.finite.tolist() == [True, False, True]
    np.testing.assert_allclose(lenient.logits[[0, 2]], predictor.predict(x[[0, 2]]).logits)


def test_provider_selection():
    assert select_providers(None, [CPU]) == [CPU]
    assert select_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert select_providers("cpu", [CUDA, CPU]) == [CPU]
    assert select_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        select_providers("cuda", [CPU])
    with pytest.raises(ConfigError, match="unknown provider"):
        select_providers("tpu", [CPU])
