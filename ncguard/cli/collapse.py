"""`ncguard collapse RUN_DIR`: the NC1-NC4 table of a trained run and collapse.png beside it.

Torch-free on purpose: it reads only what `ncguard train` wrote (collapse.json for the metrics,
metrics.json for NC1 across epochs), so it runs wherever the core is installed.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..collapse import COLLAPSE_METRICS, format_collapse_table
from ..errors import ModelError
from ..run_dir import read_json

LAYERS = ("transfer", "detection")
PLOT_FILE = "collapse.png"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_reports(run_dir: Path) -> dict[str, dict]:
    """{layer: NC report} for the transfer and detection layers, checked."""
    collapse = read_json(run_dir / "collapse.json", "the run has not finished training (resume it with `ncguard train ... --resume`)")
    layers = collapse.get("layers")
    if not isinstance(layers, dict):
        raise ModelError(f"{run_dir / 'collapse.json'} has no 'layers' object: the run directory is damaged")
    missing = [layer for layer in LAYERS if not isinstance(layers.get(layer), dict)]
    if missing:
        raise ModelError(f"{run_dir / 'collapse.json'} lacks the report of layer(s) {', '.join(missing)}")
    for layer in LAYERS:
        for key, _ in COLLAPSE_METRICS:
            value = layers[layer].get(key)
            if value is not None and not _is_number(value):
                raise ModelError(f"{run_dir / 'collapse.json'}: {layer} {key} is {value!r}, not a number")
        if not _is_number(layers[layer].get("nc1")):
            raise ModelError(f"{run_dir / 'collapse.json'}: {layer} has no NC1 value")
    return {layer: layers[layer] for layer in LAYERS}


def read_nc1_history(run_dir: Path) -> dict[str, list[float]] | None:
    """NC1 per epoch of both layers from metrics.json, or None when the run did not record it."""
    metrics = read_json(run_dir / "metrics.json", "the run has not finished training")
    history = metrics.get("nc1_history")
    if not isinstance(history, dict):
        return None
    curves = {layer: history.get(layer) for layer in LAYERS}
    if not all(isinstance(curve, list) and curve and all(_is_number(v) for v in curve) for curve in curves.values()):
        return None
    return curves


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="run directory written by `ncguard train`")


def run(args) -> int:
    """Handler of `ncguard collapse RUN_DIR`: print the table, write RUN_DIR/collapse.png."""
    from ..plots import plot_collapse  # matplotlib is slow to import; only needed here

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"run directory not found: {run_dir}")
    reports = read_reports(run_dir)
    history = read_nc1_history(run_dir)
    print(format_collapse_table(reports))
    ratio = reports["detection"]["nc1"] / reports["transfer"]["nc1"] if reports["transfer"]["nc1"] > 0 else float("nan")
    print(f"\nNC1 detection / transfer = {ratio:.3g} (below 1: the detection head is more collapsed)")
    path = plot_collapse(reports, run_dir / PLOT_FILE, nc1_history=history)
    print(f"wrote {path}")
    return 0
