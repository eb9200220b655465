"""The training loop: AdamW, linear warm-up then cosine, per-epoch validation and atomic checkpoints.

One loop serves single-process and DistributedDataParallel training: when torch.distributed is
initialized, every replica walks the same seeded permutation and draws the same augmentation
parameters for the global batch, then takes its own share (rows rank, rank + world, ...). So a
checkpoint written by rank 0 holds the only random state there is, and `resume` continues an
interrupted run exactly where the uninterrupted run would have been.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ncguard.collapse import nc1 as nc1_metric
from ncguard.errors import ConfigError, DataError, ModelError
from ncguard.stats import ClassStatistics

from .augment import Augmentation
from .files import atomic_torch_save
from .inference import accuracy_and_loss, iter_layer_features
from .losses import TrainingLoss
from .model import DualHeadModel
from .precision import PRECISIONS, UNRECORDED_PRECISION, autocast

CHECKPOINT_FORMAT = "ncguard-checkpoint-1"
NC1_LAYERS = ("transfer", "detection")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; everything here must match for a checkpoint to be resumed."""

    epochs: int
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0
    nc1_probe_size: int = 1000  # training samples on which NC1 is recorded each epoch (0: off)
    precision: str = "fp32"  # "bf16": forward pass under bfloat16 autocast (see training.precision)

    def __post_init__(self):
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 2, f"batch size must be an integer >= 2, got {self.batch_size!r}"),
            (_finite(self.lr) and self.lr > 0, f"learning rate must be a number > 0, got {self.lr!r}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay!r}"),
            (_finite(self.warmup_fraction) and 0 <= self.warmup_fraction < 1, f"warm-up fraction must be in [0, 1), got {self.warmup_fraction!r}"),
            (isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (isinstance(self.nc1_probe_size, int) and self.nc1_probe_size >= 0, f"NC1 probe size must be >= 0, got {self.nc1_probe_size!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy's legacy global and torch; optionally insist on deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warm-up to 1 over warmup_steps, then cosine decay to 0 at total_steps.

    A closed form in the step (LambdaLR) rather than chained schedulers, so the factor after a
    resume is exactly the one the uninterrupted run used.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (the frozen ETF projector is never handed to the optimizer);
    weight decay on weight matrices and kernels, not on biases and normalization scales."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def distributed_context() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes: equal fingerprints mean identical replicas."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode("utf-8"))
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    """Train a DualHeadModel on NumPy arrays; `fit` returns self with `history_` per epoch.

    callbacks are called as callback(trainer, record) after each epoch's checkpoint is written
    (an exception there interrupts the run like Ctrl-C would; `resume=True` picks it up).
    """

    def __init__(
        self,
        model: DualHeadModel,
        loss: TrainingLoss,
        settings: TrainSettings,
        augmentation: Augmentation,
        device: torch.device | str = "cpu",
        checkpoint_path: str | os.PathLike | None = None,
        callbacks: Sequence[Callable] = (),
        progress: bool = True,
    ):
        self.model = model
        self.loss = loss
        self.settings = settings
        self.augmentation = augmentation
        self.device = torch.device(device)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.callbacks = tuple(callbacks)
        self.progress = progress

    # --- set-up ---------------------------------------------------------------------------------
    def _steps_per_epoch(self, n: int) -> int:
        return max(1, n // self.settings.batch_size)

    def _identity(self) -> dict:
        """What a checkpoint must agree on to be resumed by this trainer."""
        return {
            **asdict(self.settings),
            "loss": self.loss.kind,
            "entropy_weight": self.loss.entropy_weight,
            "augmentation": self.augmentation.kind,
            "world_size": self.world_size,
        }

    def _setup(self, n: int) -> None:
        self.rank, self.world_size = distributed_context()
        per_replica = min(n, self.settings.batch_size) // self.world_size
        if per_replica < 2:
            raise ConfigError(
                f"each of the {self.world_size} replica(s) needs at least 2 samples per batch, but batch size "
                f"{self.settings.batch_size} over {n} training samples gives {per_replica}: use a larger --batch-size or more data"
            )
        # channels_last lets oneDNN run convolutions and pooling without layout conversions: a
        # large speed-up for small CNNs on CPU. Values (and the state_dict) are unaffected.
        self.memory_format = torch.channels_last if len(self.model.input_shape) == 3 else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        self.network = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=self.loss.kind == "nc"
            )
        # The fused kernel updates all parameters in one pass: on CPU it is many times faster than
        # the per-tensor loop for a small network, where the optimizer step would otherwise dominate.
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, self.settings.weight_decay), lr=self.settings.lr,
            fused=self.device.type in ("cpu", "cuda"),
        )
        total_steps = self.settings.epochs * self._steps_per_epoch(n)
        warmup_steps = max(1, int(self.settings.warmup_fraction * total_steps)) if self.settings.warmup_fraction else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
        )
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.history_ = []
        self.epochs_completed_ = 0

    # --- checkpoints ----------------------------------------------------------------------------
    def _checkpoint_state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epochs_completed_,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history_,
            "identity": self._identity(),
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None and self.rank == 0:
            atomic_torch_save(self.checkpoint_path, self._checkpoint_state())

    def _restore(self) -> None:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            raise ConfigError(f"--resume needs a checkpoint, but {path} does not exist: start the run without --resume")
        state = load_checkpoint(path)
        theirs, ours = {"precision": UNRECORDED_PRECISION, **state["identity"]}, self._identity()
        if theirs != ours:
            differences = ", ".join(
                f"{key} {theirs.get(key)!r} (now {ours.get(key)!r})" for key in sorted(set(theirs) | set(ours))
                if theirs.get(key) != ours.get(key)
            )
            raise ConfigError(f"cannot resume {path}: it was written with different settings: {differences}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"checkpoint {path} does not fit this model: {exc}") from None
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history_ = list(state["history"])
        self.epochs_completed_ = int(state["epoch"])

    # --- the loop -------------------------------------------------------------------------------
    def fit(self, x: np.ndarray, y: np.ndarray, x_val=None, y_val=None, resume: bool = False) -> "Trainer":
        """Train for settings.epochs (continuing from the checkpoint when resume), return self."""
        if len(x) != len(y):
            raise DataError(f"x has {len(x)} samples but y has {len(y)} labels")
        self._setup(len(x))
        if resume:
            self._restore()
        probe = self._nc1_probe(x, y)
        start = time.perf_counter()
        for epoch in range(self.epochs_completed_, self.settings.epochs):
            epoch_start = time.perf_counter()
            record = {"epoch": epoch + 1, **self._train_epoch(x, y, epoch)}
            self._sync_buffers()
            if x_val is not None and len(x_val):
                record["val_accuracy"], record["val_loss"] = self._evaluate(x_val, y_val)
            if probe is not None and self.rank == 0:
                record.update(self._record_nc1(*probe))
            record["lr"] = float(self.scheduler.get_last_lr()[0])
            record["seconds"] = time.perf_counter() - epoch_start
            self.history_.append(record)
            self.epochs_completed_ = epoch + 1
            self.save_checkpoint()
            self._report(record)
            for callback in self.callbacks:
                callback(self, record)
        self.train_seconds_ = time.perf_counter() - start
        return self

    def _train_epoch(self, x: np.ndarray, y: np.ndarray, epoch: int) -> dict:
        batch_size, steps = self.settings.batch_size, self._steps_per_epoch(len(x))
        order = torch.randperm(len(x), generator=self.generator)
        share = slice(self.rank, None, self.world_size)
        self.network.train()
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        bar = tqdm(
            range(steps), desc=f"epoch {epoch + 1}/{self.settings.epochs}", unit="batch", leave=False,
            disable=not self.progress or self.rank != 0 or not sys.stderr.isatty(), mininterval=0.5, file=sys.stderr,  # off a terminal: the epoch lines only
        )
        for step in bar:
            index = order[step * batch_size:(step + 1) * batch_size]
            params = self.augmentation.draw(len(index), self.generator)
            rows = index[share].numpy()
            inputs = torch.from_numpy(x[rows]).to(self.device)
            labels = torch.from_numpy(y[rows]).to(self.device)
            inputs = self.augmentation.apply(inputs, self.augmentation.slice(params, share))
            inputs = inputs.contiguous(memory_format=self.memory_format)
            with autocast(self.settings.precision, self.device):
                output = self.network(inputs)
                loss, parts = self.loss(output, labels, self.model.classifier_weight())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise ConfigError(
                    f"training diverged: the loss became {loss_value} at epoch {epoch + 1}, step {step + 1}: lower --lr"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            n = len(rows)
            totals["loss"] += loss_value * n
            totals["correct"] += float((output.logits.argmax(dim=1) == labels).sum())
            totals["count"] += n
            for name, value in parts.items():
                totals[f"part_{name}"] = totals.get(f"part_{name}", 0.0) + value * n
            bar.set_postfix(loss=f"{totals['loss'] / totals['count']:.3f}",
                            acc=f"{totals['correct'] / totals['count']:.3f}", refresh=False)
        bar.close()
        totals = self._all_reduce(totals)
        record = {"train_loss": totals["loss"] / totals["count"], "train_accuracy": totals["correct"] / totals["count"]}
        for name, value in totals.items():
            if name.startswith("part_"):
                record[f"train_{name[5:]}"] = value / totals["count"]
        return record

    def _all_reduce(self, totals: dict) -> dict:
        if self.world_size == 1:
            return totals
        names = sorted(totals)
        values = torch.tensor([totals[name] for name in names], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(values)
        return dict(zip(names, values.cpu().tolist()))

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _sync_buffers(self) -> None:
        """Give every replica rank 0's BatchNorm running statistics (DDP only syncs them at forward)."""
        if self.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer.data, src=0)

    def _evaluate(self, x_val: np.ndarray, y_val: np.ndarray) -> tuple[float, float]:
        """(accuracy, plain cross-entropy) on the validation split, sharded over replicas."""
        rows = np.arange(self.rank, len(x_val), self.world_size)
        totals = {"correct": 0.0, "loss": 0.0, "count": float(len(rows))}
        if len(rows):
            accuracy, loss = accuracy_and_loss(self.model, x_val[rows], y_val[rows], self.device)
            totals.update(correct=accuracy * len(rows), loss=loss * len(rows))
        totals = self._all_reduce(totals)
        return totals["correct"] / totals["count"], totals["loss"] / totals["count"]

    def _nc1_probe(self, x: np.ndarray, y: np.ndarray):
        """A fixed, seeded subsample of the training data on which NC1 is recorded every epoch."""
        size = min(self.settings.nc1_probe_size, len(x))
        if size == 0:
            return None
        rows = np.sort(np.random.default_rng(self.settings.seed).choice(len(x), size=size, replace=False))
        return x[rows], y[rows]

    def _record_nc1(self, x_probe: np.ndarray, y_probe: np.ndarray) -> dict:
        """NC1 of the transfer and detection features on the probe (None where undefined)."""
        stats = {layer: ClassStatistics(self.model.n_classes, per_class_covariance=False, bank_size=0) for layer in NC1_LAYERS}
        for rows, features in iter_layer_features(self.model, x_probe, NC1_LAYERS, device=self.device):
            for layer in NC1_LAYERS:
                stats[layer].partial_fit(features[layer], y_probe[rows])
        record = {}
        for layer in NC1_LAYERS:
            try:
                fitted = stats[layer].finalize()
                record[f"nc1_{layer}"] = nc1_metric(fitted.covariance_, fitted.means_, fitted.global_mean_)
            except DataError:  # a class missing from the probe, or all means equal: NC1 undefined
                record[f"nc1_{layer}"] = None
        return record

    def _report(self, record: dict) -> None:
        if not self.progress or self.rank != 0:
            return
        line = (f"epoch {record['epoch']}/{self.settings.epochs}  train loss {record['train_loss']:.4f} "
                f"acc {record['train_accuracy']:.4f}")
        if "val_accuracy" in record:
            line += f"  val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}"
        if record.get("nc1_transfer") is not None and record.get("nc1_detection") is not None:
            line += f"  NC1 transfer {record['nc1_transfer']:.3g} detection {record['nc1_detection']:.3g}"
        tqdm.write(line + f"  ({record['seconds']:.1f}s)", file=sys.stderr)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by Trainer, loaded without unpickling code (weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ModelError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not an ncguard training checkpoint")
    return state
