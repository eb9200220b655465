"""Training a dual-head model from validated options: `train(TrainOptions(...).validated())`.

Validates the options, trains, then lets training.finish fit the statistics and write the run. The
`ncguard train` command (training/cli.py) and the torchrun entry (training.ddp) are thin faces over
this module.

The run directory (every file written atomically):
    config.json       all settings, data spec, classes, input shape/scale, run id, versions
    checkpoint.pt     trainer state after the last finished epoch (what --resume continues from)
    statistics.npz    StatisticsBundle: class statistics per layer, classifier on z, the run's score and TPR in meta
    metrics.json      loss/accuracy per epoch, NC1 per epoch, test accuracy, timings
    collapse.json     NC1-NC4 of the transfer and detection layers
    model.pt          final state_dict, written last: its presence marks a finished run
Defaults that depend on the data: --arch (cnn for images, mlp for vectors), --epochs
(`default_epochs`), --entropy-weight (0.05 for the etf head, 0 for the plain and l2 baselines),
--augment (`training.augment.auto_augmentation`).
"""

from __future__ import annotations

import argparse  # TrainOptions.from_args reads a parsed namespace
import math
import platform
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from threadpoolctl import threadpool_limits

import ncguard
from ncguard.calibration import DEFAULT_TPR, check_open_unit, split_for_calibration
from ncguard.data import Dataset, load_dataset, test_split_of
from ncguard.errors import ConfigError, DataError, ModelError, NcguardError
from ncguard.pooling import DEFAULT_BLOCK_GRID, check_block_grid
from ncguard.run_dir import CONFIG_FILE, RUN_FORMAT, RunFiles, read_config
from ncguard.scores.defaults import default_score

from .augment import AUGMENTATIONS, Augmentation, auto_augmentation
from .backbones import ARCHITECTURES
from .files import atomic_write_json
from .finish import REQUIRED_LAYERS, finish_run
from .losses import LABEL_SMOOTHING, LOSSES, TrainingLoss
from .model import CLASSIFIERS, HEADS, DualHeadModel, build_model, normalization_stats
from .precision import resolve_precision
from .runs import run_settings
from .trainer import Trainer, TrainSettings, distributed_context, parameter_fingerprint, seed_everything

DEFAULT_ENTROPY_WEIGHT = 0.05
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-3
DEFAULT_CALIBRATION_FRACTION = 0.1
# Pooled conv blocks are cheap to fit and the fused score (ncguard.scores.fused) reads them, so the
# default fits every block up to block3; blocks the backbone lacks are left out of the default
# (an explicit --layers naming a missing layer is still an error).
DEFAULT_LAYERS = ("block1", "block2", "block3", "transfer", "detection")
OPTIONAL_DEFAULT_LAYERS = ("block2", "block3")
# --epochs default: about TARGET_STEPS optimizer steps, within [MIN_EPOCHS, MAX_EPOCHS] epochs.
# Fashion-MNIST (54,000 training samples at batch 128: 421 steps an epoch) gets 12 epochs
# (93.3% test accuracy); digits (1,213 samples: 9 steps an epoch) gets the 30-epoch cap
# (~99% test accuracy in well under a minute).
TARGET_STEPS = 5000
MIN_EPOCHS, MAX_EPOCHS = 3, 30
THREADS = 2


def default_epochs(n_train: int, batch_size: int) -> int:
    """Epochs for about TARGET_STEPS steps: few epochs for large data sets, more for small ones."""
    steps_per_epoch = max(1, n_train // batch_size)
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, round(TARGET_STEPS / steps_per_epoch))))


@dataclass(frozen=True)
class TrainOptions:
    """Validated `ncguard train` options (None = the data-dependent default, resolved later)."""

    data: str
    out: str
    arch: str | None = None
    epochs: int | None = None
    entropy_weight: float | None = None
    head: str = "etf"
    classifier: str = "learned"
    loss: str = "ce"
    label_smoothing: float = LABEL_SMOOTHING
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    augment: str = "auto"
    layers: tuple[str, ...] = DEFAULT_LAYERS
    block_grid: int = DEFAULT_BLOCK_GRID
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION
    tpr: float = DEFAULT_TPR
    deterministic: bool = False
    resume: bool = False
    device: str = "auto"
    precision: str = "auto"
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainOptions":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        if isinstance(values.get("layers"), str):
            values["layers"] = tuple(name.strip() for name in values["layers"].split(",") if name.strip())
        return cls(**values).validated()

    def validated(self) -> "TrainOptions":
        def choice(name, value, allowed):
            if value not in allowed:
                raise ConfigError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")

        if not isinstance(self.data, str) or not self.data.strip():
            raise ConfigError("--data must name a data SPEC (fashion-mnist, digits, FILE.npz or an image folder)")
        if not isinstance(self.out, str) or not self.out.strip():
            raise ConfigError("--out must name a run directory")
        if self.arch is not None:
            choice("arch", self.arch, ARCHITECTURES)
        choice("head", self.head, HEADS)
        choice("classifier", self.classifier, CLASSIFIERS)
        choice("loss", self.loss, LOSSES)
        choice("augment", self.augment, AUGMENTATIONS)
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ConfigError(f"--epochs must be a whole number >= 1, got {self.epochs!r}")
        if self.entropy_weight is not None and not (math.isfinite(self.entropy_weight) and self.entropy_weight >= 0):
            raise ConfigError(f"--entropy-weight must be a finite number >= 0, got {self.entropy_weight!r}")
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise ConfigError(f"--label-smoothing must be a number in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a whole number >= 0, got {self.seed!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ConfigError(f"--batch-size must be a whole number >= 2, got {self.batch_size!r}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ConfigError(f"--lr must be a number in (0, 1], got {self.lr!r}")
        if not (math.isfinite(self.calibration_fraction) and 0 < self.calibration_fraction <= 0.5):
            raise ConfigError(f"--calibration-fraction must be in (0, 0.5], got {self.calibration_fraction!r}")
        check_open_unit(self.tpr, "--tpr")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"--layers must list distinct layer names, got {','.join(self.layers)!r}")
        layers = tuple(dict.fromkeys((*self.layers, *REQUIRED_LAYERS)))
        try:
            check_block_grid(self.block_grid)
        except ConfigError as exc:
            raise ConfigError(f"--block-grid: {exc}") from None
        resolve_precision(self.precision, resolve_device(self.device))
        return TrainOptions(**{**asdict(self), "layers": layers})


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when available, else CPU; an explicit device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _check_trainable(dataset: Dataset, fit_index: np.ndarray) -> None:
    if len(dataset.classes) < 2:
        raise DataError(f"{dataset.name} has {len(dataset.classes)} class; training a classifier needs at least 2")
    counts = np.bincount(dataset.y[fit_index], minlength=len(dataset.classes))
    missing = [dataset.classes[c] for c in np.flatnonzero(counts == 0)]
    if missing:
        raise DataError(
            f"{dataset.name}: classes {missing} have no training samples after holding out the calibration split: "
            f"every class needs samples (use more data or a smaller --calibration-fraction)"
        )


def _resolved_settings(options: TrainOptions, dataset: Dataset, n_fit: int, device: torch.device) -> dict:
    """The data-dependent defaults made explicit: what config.json records and resume compares."""
    images = len(dataset.input_shape) == 3
    arch = options.arch or ("cnn" if images else "mlp")
    entropy_weight = options.entropy_weight
    if entropy_weight is None:
        entropy_weight = DEFAULT_ENTROPY_WEIGHT if options.head == "etf" else 0.0
    augment = auto_augmentation(dataset.name, dataset.input_shape) if options.augment == "auto" else options.augment
    return {
        "arch": arch,
        "head": options.head,
        "classifier": options.classifier,
        "loss": options.loss,
        "epochs": options.epochs or default_epochs(n_fit, options.batch_size),
        "batch_size": options.batch_size,
        "lr": options.lr,
        "weight_decay": TrainSettings.weight_decay,
        "warmup_fraction": TrainSettings.warmup_fraction,
        "entropy_weight": float(entropy_weight),
        "label_smoothing": float(options.label_smoothing),
        "augment": augment,
        "seed": options.seed,
        "deterministic": options.deterministic,
        "precision": resolve_precision(options.precision, device),
        "layers": list(options.layers),
        "block_grid": int(options.block_grid),
        "score": default_score(options.head),
        "tpr": options.tpr,
        "calibration_fraction": options.calibration_fraction,
    }


def _versions() -> dict:
    return {
        "ncguard": ncguard.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _prepare_run_dir(options: TrainOptions, settings: dict, data: dict, files: RunFiles) -> dict:
    """config.json for a new run, or the existing one (checked against these options) on --resume."""
    if options.resume:
        if not files.config.is_file():
            raise ConfigError(f"--resume: {files.root} has no {CONFIG_FILE}; it is not a run directory (drop --resume)")
        config = read_config(files.root)
        recorded = run_settings(config)
        changed = {key: (recorded.get(key), value) for key, value in settings.items() if recorded.get(key) != value}
        if config["data"]["spec"] != data["spec"]:
            changed["data"] = (config["data"]["spec"], data["spec"])
        if changed:
            listed = ", ".join(f"{key} {old!r} (now {new!r})" for key, (old, new) in sorted(changed.items()))
            raise ConfigError(f"--resume: {files.root} was started with different settings: {listed}")
        return config
    if files.root.exists() and not files.root.is_dir():
        raise ConfigError(f"--out {files.root} is a file, not a directory: choose a new run directory")
    if files.root.exists() and any(not _is_write_leftover(p) for p in files.root.iterdir()):
        if files.config.is_file():
            raise ConfigError(
                f"--out {files.root} already exists and is not an empty directory: it holds a run; add --resume to "
                f"continue it (also when it was stopped before its first checkpoint), or choose a new run directory"
            )
        raise ConfigError(f"--out {files.root} already exists and is not an empty directory, and holds no run "
                          f"(no {CONFIG_FILE}): choose a new run directory")
    config = {
        "format": RUN_FORMAT,
        "run_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "data": data,
        "versions": _versions(),
    }
    atomic_write_json(files.config, config)
    return config


def _is_write_leftover(path: Path) -> bool:
    """A temporary file that ncguard.atomic.atomic_write left behind when killed mid-write
    (`.NAME.XXXX.tmp`): not part of any run, so it does not make a directory "not empty"."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


def _available_layers(model: DualHeadModel) -> tuple[str, ...]:
    probe = torch.zeros((2, *model.input_shape))
    model.eval()
    with torch.inference_mode():
        return tuple(model.layer_features(probe))


def _shared_outcome(rank: int, world_size: int, action):
    """Run `action` on rank 0 only and give every replica its result, or its error, so that a
    refused --out stops all processes instead of leaving the others waiting in a collective."""
    outcome = [None, None]
    if rank == 0:
        try:
            outcome = [action(), None]
        except NcguardError as exc:
            outcome = [None, (type(exc).__name__, str(exc))]
    if world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        kind, message = outcome[1]
        raise {"ConfigError": ConfigError, "DataError": DataError}.get(kind, ModelError)(message)
    return outcome[0]


def _replica_report(model: DualHeadModel, world_size: int) -> dict | None:
    """Every replica's parameter fingerprint (DDP only), for metrics.json."""
    if world_size == 1:
        return None
    fingerprints = [None] * world_size
    dist.all_gather_object(fingerprints, parameter_fingerprint(model))
    return {
        "world_size": world_size,
        "backend": dist.get_backend(),
        "parameter_fingerprints": fingerprints,
        "replicas_agree": len(set(fingerprints)) == 1,
    }


def train(options: TrainOptions, callbacks=()) -> dict | None:
    """Run `ncguard train` end to end; returns a summary (run dir, accuracies, NC1, score and TPR).

    Under torch.distributed every process calls this; rank 0 writes the run and gets the
    summary, the other ranks return None. NumPy's BLAS is held to one thread meanwhile: its
    spinning worker threads otherwise steal the cores from torch's (digits, 5 epochs on 2 busy
    cores: 60 s with both pools at 2 threads, 9 s with BLAS at 1). `callbacks` are the Trainer's
    (callback(trainer, record) after each epoch, outside the epoch's timed seconds): how
    benchmarks/train_time.py follows test accuracy epoch by epoch.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _train(options, tuple(callbacks))


def _train(options: TrainOptions, callbacks: tuple = ()) -> dict | None:
    started = time.perf_counter()
    rank, world_size = distributed_context()
    torch.set_num_threads(max(1, THREADS // world_size))
    device = resolve_device(options.device)
    dataset = load_dataset(options.data)
    fit_index, calibration_index = split_for_calibration(len(dataset), options.calibration_fraction, options.seed)
    _check_trainable(dataset, fit_index)
    test_spec = test_split_of(options.data)
    settings = _resolved_settings(options, dataset, len(fit_index), device)
    data = {
        "spec": options.data,
        "name": dataset.name,
        "classes": list(dataset.classes),
        "input_shape": list(dataset.input_shape),
        "input_scale": dataset.input_scale,
        "n_samples": len(dataset),
        "n_fit": int(len(fit_index)),
        "n_calibration": int(len(calibration_index)),
        "calibration_fraction": options.calibration_fraction,
        "calibration_seed": options.seed,
        "test_spec": test_spec,
    }
    files = RunFiles(Path(options.out))
    seed_everything(options.seed, options.deterministic)
    fit_data, calibration_data = dataset.subset(fit_index), dataset.subset(calibration_index)
    mean, std = normalization_stats(fit_data.x)
    model = build_model(
        settings["arch"], dataset.input_shape, len(dataset.classes), settings["head"], settings["classifier"], mean, std,
        settings["block_grid"],
    )
    available = _available_layers(model)
    if tuple(settings["layers"]) == tuple(dict.fromkeys((*DEFAULT_LAYERS, *REQUIRED_LAYERS))):
        settings["layers"] = [layer for layer in settings["layers"] if layer in available or layer not in OPTIONAL_DEFAULT_LAYERS]
    unknown = [layer for layer in settings["layers"] if layer not in available]
    if unknown:
        raise ConfigError(f"--layers: {', '.join(unknown)} not in the {settings['arch']} model; available: {', '.join(available)}")
    trainer = Trainer(
        model,
        TrainingLoss(settings["loss"], settings["entropy_weight"], settings.get("label_smoothing", LABEL_SMOOTHING)),
        TrainSettings(epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"], seed=settings["seed"],
                      precision=settings["precision"]),
        Augmentation(settings["augment"], dataset.input_shape),
        device=device,
        checkpoint_path=files.checkpoint,
        callbacks=callbacks,
        progress=not options.quiet,
    )
    config = _shared_outcome(rank, world_size, lambda: _prepare_run_dir(options, settings, data, files))
    # A run stopped before its first checkpoint has its config.json and no checkpoint.pt: it
    # finished zero epochs, so resuming it is training from epoch 0 with that config (same run id,
    # seed and settings, which _prepare_run_dir has checked), not an error.
    resume = options.resume and _shared_outcome(rank, world_size, files.checkpoint.is_file)
    if options.resume and not resume and rank == 0 and not options.quiet:
        print(f"--resume: {files.root} has no checkpoint yet (stopped before its first epoch ended); training from epoch 1")
    trainer.fit(fit_data.x, fit_data.y, calibration_data.x, calibration_data.y, resume=resume)
    replicas = _replica_report(model, world_size)
    if rank != 0:
        return None
    train_seconds = sum(record["seconds"] for record in trainer.history_)
    return finish_run(
        model, trainer.history_, config, files, fit_data, device, train_seconds, started, replicas
    )


