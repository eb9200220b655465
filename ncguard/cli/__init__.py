"""The `ncguard` command line: the face of the project.

Each command lives in its own module, which defines `add_arguments(parser)` (its flags, next to
the defaults they use) and a handler: `ncguard/cli/<command>.py` for the torch-free commands, and
the command modules of training/ (train), export/ (export) and serving/ (serve), which this
package dispatches to by name (`audit` is still `ncguard/audit_cli.py`). This package is the only
part of ncguard/ that may dispatch to training/, export/ or serving/. Only the module of the command
being run is imported, so `ncguard --help` and the torch-free commands never import torch; only
`train` (and `export`) need it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable

from .. import __version__
from ..errors import NcguardError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str
    handler: str = "run"
    arguments: str = "add_arguments"

    def load(self, attribute: str) -> Callable:
        return getattr(importlib.import_module(self.module), attribute)


COMMANDS: list[Command] = [
    Command("train", "train a dual-head classifier with controlled neural collapse", "training.cli", "run_train", "add_train_arguments"),
    Command("collapse", "neural-collapse metrics NC1-NC4 per layer of a trained run", "ncguard.cli.collapse"),
    Command("export", "export a run as one self-contained ONNX file with label and OOD score", "export.cli", "run_export"),
    Command("predict", "score files locally with an exported model (no server)", "ncguard.cli.predict"),
    Command("evaluate", "OOD detection quality of an exported model: table, JSON and plots", "ncguard.cli.evaluate"),
    Command("serve", "serve an exported model over HTTP with BentoML", "serving.cli", "run_serve"),
    Command("fit", "add OOD scoring to an existing ONNX classifier (bring your own model)", "ncguard.cli.fit"),
    Command("inspect", "list an ONNX classifier's inputs, outputs and candidate feature tensors", "ncguard.cli.inspect"),
    Command("data", "read a data SPEC and describe it (shape, classes, counts)", "ncguard.cli.data"),
    Command("audit", "OOD and drift audit of whole datasets: per-row Parquet, aggregates, report (local or Ray)", "ncguard.audit_cli"),
    Command("keygen", "make an Ed25519 key pair for signing models (--sign-key) and verifying them (--verify-key)", "ncguard.cli.keygen"),
]


def _chosen(argv: list[str]) -> Command | None:
    """The command named on the command line (the first word that is one)."""
    names = {c.name: c for c in COMMANDS}
    return next((names[word] for word in argv if word in names), None)


def _available(command: Command) -> bool:
    return importlib.util.find_spec(command.module) is not None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="ncguard",
        description="Train, export, serve and monitor classifiers that flag out-of-distribution inputs.",
    )
    parser.add_argument("--version", action="version", version=f"ncguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for command in COMMANDS:
        help_text = command.help if _available(command) else f"{command.help} [not available yet]"
        p = sub.add_parser(command.name, help=help_text, description=help_text)
        p.set_defaults(_command=command)
        if command is chosen and _available(command):
            command.load(command.arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "_command", None)
    if command is None:
        parser.print_help()
        return 2
    if not _available(command):
        print(f"ncguard {command.name}: not available yet in this version", file=sys.stderr)
        return 2
    try:
        result = command.load(command.handler)(args)
    except NcguardError as exc:
        print(f"ncguard {command.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ncguard {command.name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
