"""The trainer: frozen projector, schedule, augmentation, checkpoints and exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncguard.data import load_dataset
from ncguard.errors import ConfigError, ModelError
from training.augment import Augmentation, auto_augmentation
from training.losses import TrainingLoss
from training.model import build_model
from training.precision import cpu_has_fast_bf16
from training.trainer import Trainer, TrainSettings, load_checkpoint, seed_everything, warmup_cosine


@pytest.fixture(scope="module")
def digits():
    """A small slice of the digits train split: (x, y, x_val, y_val)."""
    data = load_dataset("digits")
    return data.x[:320], data.y[:320], data.x[320:400], data.y[320:400]


def make_trainer(checkpoint_path=None, epochs=2, callbacks=(), batch_size=64, loss="ce", augment="shift", precision="fp32"):
    seed_everything(0)
    model = build_model("cnn", (1, 8, 8), 10)
    return Trainer(
        model,
        TrainingLoss(loss, entropy_weight=0.05),
        TrainSettings(epochs=epochs, batch_size=batch_size, nc1_probe_size=100, precision=precision),
        Augmentation(augment, (1, 8, 8)),
        checkpoint_path=checkpoint_path,
        callbacks=callbacks,
        progress=False,
    )


class Interrupt(Exception):
    """Raised from an epoch callback: the run stops as it would on Ctrl-C, after the checkpoint."""


def interrupt_after(epoch):
    def callback(trainer, record):
        if record["epoch"] == epoch:
            raise Interrupt

    return callback


def without_timing(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_frozen_projector_is_unchanged_by_training_and_not_optimized(digits):
    x, y, _, _ = digits
    trainer = make_trainer(epochs=1)
    projector_before = [p.detach().clone() for p in trainer.model.projector.parameters()]
    backbone_before = [p.detach().clone() for p in trainer.model.backbone.parameters()]
    trainer.fit(x, y)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for before, after in zip(projector_before, trainer.model.projector.parameters()):
        assert torch.equal(before, after)
        assert id(after) not in optimized and after.grad is None
    assert any(not torch.equal(b, a) for b, a in zip(backbone_before, trainer.model.backbone.parameters()))


def test_training_learns_and_records_history(digits):
    x, y, x_val, y_val = digits
    trainer = make_trainer(epochs=5, batch_size=32).fit(x, y, x_val, y_val)
    assert [r["epoch"] for r in trainer.history_] == [1, 2, 3, 4, 5]
    last = trainer.history_[-1]
    assert last["val_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert last["train_loss"] < trainer.history_[0]["train_loss"]
    assert {"train_ce", "train_entropy", "nc1_transfer", "nc1_detection", "lr"} <= set(last)
    assert all(r["nc1_transfer"] > 0 and r["nc1_detection"] > 0 for r in trainer.history_)


BF16 = pytest.param("bf16", marks=pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bfloat16"))


@pytest.mark.parametrize("precision", ["fp32", BF16])
def test_resume_reproduces_the_uninterrupted_run_exactly(digits, tmp_path, precision):
    x, y, x_val, y_val = digits
    uninterrupted = make_trainer(tmp_path / "a" / "checkpoint.pt", epochs=3, precision=precision).fit(x, y, x_val, y_val)

    with pytest.raises(Interrupt):
        make_trainer(tmp_path / "b" / "checkpoint.pt", epochs=3, callbacks=[interrupt_after(1)], precision=precision).fit(x, y, x_val, y_val)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    torch.manual_seed(12345)  # a fresh process would start from different global RNG state
    resumed = make_trainer(tmp_path / "b" / "checkpoint.pt", epochs=3, precision=precision).fit(x, y, x_val, y_val, resume=True)

    expected, actual = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    expected_opt, actual_opt = uninterrupted.optimizer.state_dict(), resumed.optimizer.state_dict()
    for index, state in expected_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(value, actual_opt["state"][index][key]), (index, key)
    assert torch.equal(uninterrupted.generator.get_state(), resumed.generator.get_state())
    assert without_timing(uninterrupted.history_) == without_timing(resumed.history_)
    assert resumed.scheduler.last_epoch == uninterrupted.scheduler.last_epoch


def test_resume_refuses_a_checkpoint_with_other_settings(digits, tmp_path):
    x, y, _, _ = digits
    path = tmp_path / "checkpoint.pt"
    make_trainer(path, epochs=1).fit(x, y)
    with pytest.raises(ConfigError, match=r"batch_size 64 \(now 32\)"):
        make_trainer(path, epochs=1, batch_size=32).fit(x, y, resume=True)


@pytest.mark.parametrize("precision", ["fp32", BF16])
def test_training_learns_in_either_precision_and_the_model_stays_fp32(digits, precision):
    x, y, x_val, y_val = digits
    trainer = make_trainer(epochs=5, batch_size=32, precision=precision).fit(x, y, x_val, y_val)
    assert trainer.history_[-1]["val_accuracy"] > 0.5 and trainer.history_[-1]["train_loss"] < trainer.history_[0]["train_loss"]
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_a_checkpoint_from_before_precision_was_recorded_resumes_as_fp32(digits, tmp_path):
    x, y, _, _ = digits
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):
        make_trainer(path, epochs=2, callbacks=[interrupt_after(1)]).fit(x, y)
    state = load_checkpoint(path)
    del state["identity"]["precision"]  # what a checkpoint written before the setting existed holds
    torch.save(state, path)
    assert make_trainer(path, epochs=2).fit(x, y, resume=True).epochs_completed_ == 2
    with pytest.raises(ConfigError, match=r"precision 'fp32' \(now 'bf16'\)"):
        make_trainer(path, epochs=2, precision="bf16").fit(x, y, resume=True)


def test_precision_choices_are_resolved_and_checked(monkeypatch):
    import training.precision as precision

    assert TrainSettings(epochs=1).precision == "fp32"
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        TrainSettings(epochs=1, precision="auto")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert precision.resolve_precision("auto", torch.device("cuda")) == "fp32"  # unmeasured there: unchanged
    assert precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="no native bfloat16"):
        precision.resolve_precision("bf16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="--precision 'fp16' is not one of: auto, fp32, bf16"):
        precision.resolve_precision("fp16", torch.device("cpu"))


def test_resume_without_checkpoint_and_corrupt_checkpoints_are_clear_errors(digits, tmp_path):
    x, y, _, _ = digits
    with pytest.raises(ConfigError, match="does not exist"):
        make_trainer(tmp_path / "missing.pt").fit(x, y, resume=True)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        make_trainer(corrupt).fit(x, y, resume=True)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ModelError, match="not an ncguard training checkpoint"):
        load_checkpoint(foreign)


def test_checkpoint_loads_without_unpickling_code(digits, tmp_path):
    x, y, _, _ = digits
    path = tmp_path / "checkpoint.pt"
    make_trainer(path, epochs=1).fit(x, y)
    state = torch.load(path, weights_only=True)  # raises if anything but tensors and plain data is inside
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "generator", "history"}


def test_nc_loss_trains(digits):
    x, y, x_val, y_val = digits
    trainer = make_trainer(epochs=2, loss="nc", batch_size=80).fit(x, y, x_val, y_val)
    first, last = trainer.history_
    assert {"train_nc1", "train_nc3", "train_equinorm_means"} <= set(last)
    assert last["train_nc1"] < first["train_nc1"]


def test_batch_too_small_for_the_data_is_refused(digits):
    x, y, _, _ = digits
    with pytest.raises(ConfigError, match="at least 2 samples per batch"):
        make_trainer(batch_size=2).fit(x[:1], y[:1])


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="epochs"):
        TrainSettings(epochs=0)
    with pytest.raises(ConfigError, match="learning rate"):
        TrainSettings(epochs=1, lr=float("nan"))
    with pytest.raises(ConfigError, match="batch size"):
        TrainSettings(epochs=1, batch_size=1)


def test_warmup_then_cosine_schedule():
    factors = [warmup_cosine(step, 10, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # falling after
    assert factors[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)


def test_augmentation_shifts_and_flips_images():
    augmentation = Augmentation("shift-flip", (1, 8, 8))
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    pad = augmentation.pad
    centred = {"offsets": torch.full((2, 2), pad), "flip": torch.tensor([False, True])}
    out = augmentation.apply(x, centred)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    shifted = augmentation.apply(x, {"offsets": torch.tensor([[pad + 1, pad], [pad, pad]]), "flip": torch.tensor([False, False])})
    assert torch.equal(shifted[0, :, :-1], x[0, :, 1:]) and torch.all(shifted[0, :, -1] == 0)
    generator = torch.Generator().manual_seed(0)
    params = augmentation.draw(1000, generator)
    assert params["offsets"].min() == 0 and params["offsets"].max() == 2 * pad
    assert 400 < int(params["flip"].sum()) < 600


def test_augmentation_choice_depends_on_the_data():
    assert auto_augmentation("fashion-mnist:train", (1, 28, 28)) == "shift-flip"
    assert auto_augmentation("digits:train", (1, 8, 8)) == "shift"  # a flipped digit is another symbol
    assert auto_augmentation("embeddings.npz", (64,)) == "none"
    with pytest.raises(ConfigError, match="needs images"):
        Augmentation("shift", (64,))
    vectors = torch.randn(4, 64)
    none = Augmentation("none", (64,))
    assert torch.equal(none.apply(vectors, none.draw(4, torch.Generator())), vectors)
