"""`make demo`: the whole pipeline on scikit-learn's bundled digits, as a user would run it.

Each stage is the real `ncguard` command in a subprocess, printed before it runs. A stage
whose command has not landed yet ends the demo there and says so: nothing is faked.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from . import COMMANDS

OUT = Path("demo-out")


def _available(command: str) -> bool:
    return any(c.name == command and importlib.util.find_spec(c.module) is not None for c in COMMANDS)


def _run(*args: str) -> None:
    print(f"\n$ ncguard {shlex.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "ncguard", *args])
    if result.returncode != 0:
        raise SystemExit(f"demo: `ncguard {args[0]}` failed with exit code {result.returncode}")


def main() -> int:
    OUT.mkdir(exist_ok=True)
    run_dir, model = OUT / "digits-run", OUT / "digits.onnx"
    if run_dir.exists():  # the demo's own run from an earlier `make demo`: start afresh
        print(f"demo: replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    stages = [
        ("train", ["train", "--data", "digits", "--out", str(run_dir)]),
        ("collapse", ["collapse", str(run_dir)]),
        ("export", ["export", str(run_dir), "--out", str(model)]),
        ("predict", ["predict", str(model), str(OUT / "id-and-ood.npz")]),
    ]
    for name, args in stages:
        if not _available(name):
            print(f"\ndemo: the pipeline ends here for now: `ncguard {name}` has not landed yet.")
            return 0
        if name == "predict":
            _write_id_and_ood_inputs(OUT / "id-and-ood.npz")
        _run(*args)
    if _available("serve"):
        from .demo_serve import serve_and_query

        serve_and_query(model, OUT / "id-and-ood.npz")
    else:
        print("\ndemo: the pipeline ends here for now: `ncguard serve` has not landed yet.")
    return 0


def _write_id_and_ood_inputs(path: Path) -> None:
    """Held-out digits (in distribution) beside noise and inverted digits (out of distribution),
    made by the same synthetic OOD sets `ncguard evaluate` offers (noise:uniform, inverted:SPEC)."""
    import numpy as np

    from ..data import load_dataset
    from ..ood_data import inverted_dataset, noise_dataset

    test = load_dataset("digits:test")
    noise = noise_dataset("uniform", test, seed=0).x[:3]
    inverted = inverted_dataset(test).x[5:8]
    x = np.concatenate([test.x[:5], noise, inverted])
    kind = np.array(["id"] * 5 + ["ood:noise"] * 3 + ["ood:inverted"] * 3)
    np.savez(path, x=x, kind=kind)
    print(f"\ndemo: wrote {len(x)} inputs to {path}: 5 held-out digits, 3 noise images, 3 inverted digits")


if __name__ == "__main__":
    sys.exit(main())
