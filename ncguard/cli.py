"""The `ncguard` command line.

Each subcommand's arguments are declared here; its work lives in the module named by
`handler`, imported only when the command runs, so `ncguard --help` and the torch-free
commands never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from .errors import NcguardError

PENDING = "not available yet: lands with issue #{issue} ({what})"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: str | None  # "module:function", or None while a later issue fills it in
    add_arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda p: None)
    pending_issue: int | None = None


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data SPEC: fashion-mnist[:train|:test], digits, FILE.npz or an image folder")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--arch", default="cnn", help="backbone: cnn, resnet18 or mlp")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--entropy-weight", type=float, default=None, help="weight of the entropy regularizer on the transfer features (0 disables it)")
    p.add_argument("--head", default="etf", help="detection head: etf, plain or l2")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `ncguard train`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--score", default=None, help="OOD score to embed")
    p.add_argument("--tpr", type=float, default=0.95, help="fraction of in-distribution inputs the threshold keeps")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported .onnx model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, default=1)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported .onnx model")
    p.add_argument("--id", required=True, help="in-distribution data SPEC")
    p.add_argument("--ood", required=True, action="append", help="out-of-distribution data SPEC (repeatable)")


def _collapse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `ncguard train`")


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="existing ONNX classifier")
    p.add_argument("--features", required=True, help="output or intermediate tensor to use as features")
    p.add_argument("--data", required=True, help="in-distribution data SPEC")
    p.add_argument("--out", required=True, help="ONNX file to write")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported .onnx model")
    p.add_argument("files", nargs="+", help="images, .npy or .npz files")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="data SPEC to read and describe")


COMMANDS: list[Command] = [
    Command("train", "train a dual-head classifier with controlled neural collapse", None, _train_args, pending_issue=3),
    Command("collapse", "neural-collapse metrics NC1-NC4 per layer of a trained run", None, _collapse_args, pending_issue=3),
    Command("export", "export a run as one self-contained ONNX file with label and OOD score", None, _export_args, pending_issue=4),
    Command("predict", "score files locally with an exported model (no server)", None, _predict_args, pending_issue=4),
    Command("evaluate", "OOD detection quality of an exported model: table, JSON and plots", None, _evaluate_args, pending_issue=4),
    Command("serve", "serve an exported model over HTTP with BentoML", None, _serve_args, pending_issue=5),
    Command("fit", "add OOD scoring to an existing ONNX classifier (bring your own model)", None, _fit_args, pending_issue=8),
    Command("data", "read a data SPEC and describe it (shape, classes, counts)", "ncguard.data_cli:run", _data_args),
]

_WHAT = {3: "training", 4: "export", 5: "serving", 8: "bring your own model"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncguard",
        description="Train, export, serve and monitor classifiers that flag out-of-distribution inputs.",
    )
    parser.add_argument("--version", action="version", version=f"ncguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        help_text = command.help
        if command.handler is None:
            help_text += f" [{PENDING.format(issue=command.pending_issue, what=_WHAT[command.pending_issue])}]"
        p = sub.add_parser(command.name, help=help_text, description=help_text)
        command.add_arguments(p)
        p.set_defaults(_command=command)
    return parser


def _resolve(handler: str) -> Callable[[argparse.Namespace], int | None]:
    module_name, func_name = handler.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "_command", None)
    if command is None:
        parser.print_help()
        return 2
    if command.handler is None:
        what = _WHAT[command.pending_issue]
        print(f"ncguard {command.name}: {PENDING.format(issue=command.pending_issue, what=what)}", file=sys.stderr)
        return 2
    try:
        result = _resolve(command.handler)(args)
    except NcguardError as exc:
        print(f"ncguard {command.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ncguard {command.name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
