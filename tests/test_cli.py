"""The command line as users meet it: help, exit codes and errors without tracebacks."""

import subprocess
import sys

import pytest

from ncguard.cli import COMMANDS

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


def test_command_help_shows_its_own_flags():
    assert "--entropy-weight" in run_cli("train", "--help").stdout
    assert "--tpr" in run_cli("export", "--help").stdout
    assert "--all-scores" in run_cli("evaluate", "--help").stdout
    assert "--workers" in run_cli("serve", "--help").stdout


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2
    assert "usage:" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "/no/such/model.onnx", "x.npy"], "model file not found"),
        (["evaluate", "/no/such/model.onnx", "--id", "digits:test", "--ood", "noise:uniform"], "model file not found"),
        (["serve", "/no/such/model.onnx"], "model file not found"),
        (["collapse", "/no/such/run"], "not found"),
        (["data", "no-such-spec"], "no-such-spec"),
    ],
)
def test_errors_name_the_problem_without_a_traceback(argv, message):
    result = run_cli(*argv)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
