"""The core and the service must work on machines without torch (DESIGN.md section 2)."""

import json
import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class _BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name == "onnxscript":
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    """
)

IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil
    imported = []
    for package_name in ("ncguard", "serving"):
        package = importlib.import_module(package_name)
        imported.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
            imported.append(info.name)
    assert "torch" not in sys.modules
    print(json.dumps(imported))
    """
)


IMPORT_CORE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import ncguard
    for info in pkgutil.walk_packages(ncguard.__path__, prefix="ncguard."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in ("export", "training", "serving"))))
    """
)


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_blocker_really_blocks_torch():
    result = _run_blocked("import torch")
    assert result.returncode != 0
    assert "blocked in this test" in result.stderr


def test_core_and_serving_import_without_torch():
    result = _run_blocked(IMPORT_ALL)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert "ncguard.cli" in imported
    assert "serving" in imported


def test_cli_help_without_torch():
    result = _run_blocked("import sys; from ncguard.cli import main; sys.argv = ['ncguard', '--help']; main()")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout


def test_the_core_imports_no_export_training_or_serving():
    """Imports point toward ncguard/ (DESIGN.md section 2): no core module, the command modules of
    ncguard/cli/ included, imports export/, training/ or serving/ when it loads; ncguard/cli/ reaches
    them only from inside the command that needs them."""
    result = _run_blocked(IMPORT_CORE)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
