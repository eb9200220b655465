"""`ncguard train`: the command's flags and handler; the work is in training.train (`python -m training.cli`
runs the same as `ncguard train`)."""

from __future__ import annotations

import argparse
import sys

from ncguard.calibration import DEFAULT_TPR
from ncguard.errors import NcguardError
from ncguard.pooling import DEFAULT_BLOCK_GRID

from .losses import LABEL_SMOOTHING
from .train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIBRATION_FRACTION,
    DEFAULT_LAYERS,
    DEFAULT_LR,
    TrainOptions,
    train,
)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every `ncguard train` flag, next to the defaults (training.train) they use."""
    p.add_argument("--data", required=True, help="data SPEC: fashion-mnist[:train|:test], digits, FILE.npz or an image folder")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--arch", default=None, help="backbone: cnn, cnn-linear (cnn without the ReLU on h), resnet18 or mlp (default: cnn for images, mlp for vectors)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: about 5000 steps, 3 to 30 epochs: 12 for fashion-mnist, 30 for digits)")
    p.add_argument("--entropy-weight", type=float, default=None, help="weight of the entropy regularizer on the transfer features, 0 disables it (default: 0.05 for --head etf, else 0)")
    p.add_argument("--head", default="etf", help="detection head: etf, plain or l2")
    p.add_argument("--classifier", default="learned", help="classifier on the detection features: learned or simplex (fixed class-simplex ETF)")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING, help=f"label smoothing of the cross-entropy, in [0, 1) (default {LABEL_SMOOTHING})")
    p.add_argument("--loss", default="ce", help="ce (label-smoothed cross-entropy) or nc (differentiable NC1+NC2+NC3)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="global batch size")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak AdamW learning rate")
    p.add_argument("--augment", default="auto", help="auto, none, shift or shift-flip (auto: shift-flip for fashion-mnist, shift for other images, none for vectors)")
    p.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="comma-separated layers whose class statistics are fitted (transfer and detection always)")
    p.add_argument("--block-grid", type=int, default=DEFAULT_BLOCK_GRID, help="also average each conv block channel on an N x N grid, beside its whole-map mean and std, for the block statistics the OOD score reads: 2 helps near OOD and rotation, costs some blur and noise detection, and needs tens of thousands of training images (default 0: whole maps only; ncguard/pooling.py says why)")
    p.add_argument("--calibration-fraction", type=float, default=DEFAULT_CALIBRATION_FRACTION, help="fraction of the training data held out (validation while training; `ncguard export` calibrates the OOD threshold and the temperature on it)")
    p.add_argument("--tpr", type=float, default=DEFAULT_TPR, help="fraction of held-out in-distribution inputs the threshold keeps")
    p.add_argument("--deterministic", action="store_true", help="use deterministic kernels only (slower on GPU)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16: bf16 runs the training step under bfloat16 autocast, about 1.5x faster on a CPU with AVX512-BF16 or AMX (auto: bf16 there, fp32 elsewhere); the model stays fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def print_summary(summary: dict) -> None:
    accuracy = summary["test_accuracy"] if summary["test_accuracy"] is not None else summary["val_accuracy"]
    which = "test" if summary["test_accuracy"] is not None else "held-out"
    print(f"run {summary['run_id']} written to {summary['run_dir']} in {summary['total_seconds']:.0f}s")
    print(f"{which} accuracy {accuracy:.4f}; NC1 transfer {summary['nc1']['transfer']:.4g}, "
          f"detection {summary['nc1']['detection']:.4g}; score {summary['score']} at TPR {summary['tpr']:g} "
          "(its threshold is calibrated by `ncguard export`)")


def run_train(args: argparse.Namespace) -> int:
    """Handler of `ncguard train` (wired in ncguard/cli/__init__.py)."""
    print_summary(train(TrainOptions.from_args(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m training.cli ...`: the same as `ncguard train ...`."""
    parser = argparse.ArgumentParser(prog="ncguard train", description="train a dual-head classifier")
    add_train_arguments(parser)
    try:
        return run_train(parser.parse_args(argv))
    except NcguardError as exc:
        print(f"ncguard train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
