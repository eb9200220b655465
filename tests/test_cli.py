"""The command line as users meet it: help, exit codes and errors without tracebacks."""

import subprocess
import sys

import pytest

from ncguard.cli import COMMANDS, build_parser, main

DESIGN_COMMANDS = {"train", "export", "serve", "evaluate", "collapse", "fit", "predict"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ncguard", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_design_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in DESIGN_COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(c.name for c in COMMANDS))
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: ncguard " + command in result.stdout


def test_pending_commands_say_so_plainly(capsys):
    pending = [c for c in COMMANDS if c.handler is None]
    for command in pending:
        parser = build_parser()
        required = [a for a in parser._subparsers._group_actions[0].choices[command.name]._actions if a.required]
        argv = [command.name]
        for action in required:
            argv += ([action.option_strings[0]] if action.option_strings else []) + ["x"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "not available yet" in err and f"#{command.pending_issue}" in err


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2
    assert "usage:" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert "Traceback" not in result.stderr
