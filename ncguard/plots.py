"""PNG figures for `ncguard evaluate` and `ncguard collapse`.

matplotlib is imported inside each function (it is slow to import and only these commands need
it) and used through Figure + the Agg canvas, never pyplot: no global state, no display needed.
Every file is written atomically.
"""

from __future__ import annotations

import os

import numpy as np

from ncguard.atomic import atomic_write
from ncguard.collapse import COLLAPSE_METRICS
from ncguard.errors import DataError
from ncguard.calibration import check_scores
from ncguard.ood_metrics import auroc, roc_curve


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_atomically(figure, path) -> str:
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=110))
    return os.fspath(path)


def _check_ood_sets(ood_sets) -> dict[str, np.ndarray]:
    if not ood_sets:
        raise DataError("ood_sets is empty: give at least one named set of OOD scores")
    return {name: check_scores(scores, f"OOD scores of {name!r}") for name, scores in ood_sets.items()}


def plot_score_histograms(id_scores, ood_sets: dict[str, np.ndarray], threshold, path) -> str:
    """Overlaid score histograms (ID and each OOD set, shared bins) with the threshold marked."""
    id_scores = check_scores(id_scores, "id_scores")
    ood_sets = _check_ood_sets(ood_sets)
    edges = np.histogram_bin_edges(np.concatenate([id_scores, *ood_sets.values()]), bins=60)
    figure = _new_figure(7.0, 4.2)
    axes = figure.add_subplot()
    axes.hist(id_scores, bins=edges, density=True, histtype="stepfilled", alpha=0.35, label="ID", color="tab:blue")
    for name, scores in ood_sets.items():
        axes.hist(scores, bins=edges, density=True, histtype="step", linewidth=1.5, label=f"OOD: {name}")
    axes.axvline(float(threshold), color="black", linestyle="--", linewidth=1.2, label=f"threshold {float(threshold):.4g}")
    axes.set_xlabel("OOD score (higher = more likely OOD)")
    axes.set_ylabel("density")
    axes.set_title("Score distributions")
    axes.legend(fontsize="small")
    return _save_atomically(figure, path)


def plot_roc_curves(id_scores, ood_sets: dict[str, np.ndarray], path) -> str:
    """ROC curve per OOD set: fraction of OOD flagged against fraction of ID flagged."""
    id_scores = check_scores(id_scores, "id_scores")
    ood_sets = _check_ood_sets(ood_sets)
    figure = _new_figure(5.5, 5.0)
    axes = figure.add_subplot()
    for name, scores in ood_sets.items():
        false_positive, true_positive, _ = roc_curve(id_scores, scores)
        axes.plot(false_positive, true_positive, label=f"{name} (AUROC {auroc(id_scores, scores):.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("ID inputs flagged as OOD (FPR)")
    axes.set_ylabel("OOD inputs flagged (TPR)")
    axes.set_title("ROC, OOD = positive")
    axes.legend(fontsize="small", loc="lower right")
    return _save_atomically(figure, path)


def plot_collapse(reports: dict[str, dict], path, nc1_history: dict[str, list[float]] | None = None) -> str:
    """One bar panel per NC metric (layers side by side), plus NC1 per epoch if history is given."""
    if not reports:
        raise DataError("no collapse reports to plot")
    layers = list(reports)
    metrics = [
        (key, label)
        for key, label in COLLAPSE_METRICS
        if any(reports[layer].get(key) is not None for layer in layers)
    ]
    n_panels = len(metrics) + (1 if nc1_history else 0)
    columns = min(3, n_panels)
    rows = -(-n_panels // columns)
    figure = _new_figure(4.0 * columns, 3.2 * rows)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(layers))]
    for axes, (key, label) in zip(panels, metrics):
        values = [reports[layer].get(key) for layer in layers]
        heights = [np.nan if value is None else float(value) for value in values]
        bars = axes.bar(range(len(layers)), np.nan_to_num(heights), color=colors)
        # Values printed on the bars: a zero or a round-off 1e-16 bar is otherwise invisible or misleading.
        axes.bar_label(bars, ["n/a" if value is None else f"{value:.3g}" for value in values], fontsize="small")
        axes.margins(y=0.15)
        axes.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize="small")
        axes.set_title(label, fontsize="medium")
        if key == "nc1" and all(h > 0 for h in heights):
            axes.set_yscale("log")  # NC1 spans orders of magnitude during training
        else:
            axes.set_ylim(bottom=0.0)
    if nc1_history:
        axes = panels[len(metrics)]
        for layer, history in nc1_history.items():
            epochs = np.arange(1, len(history) + 1)
            axes.plot(epochs, np.asarray(history, dtype=np.float64), marker="o", markersize=3, label=layer)
        if all(value > 0 for history in nc1_history.values() for value in history):
            axes.set_yscale("log")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set_xlabel("epoch")
        axes.set_title("NC1 during training", fontsize="medium")
        axes.legend(fontsize="small")
    for axes in panels[n_panels:]:
        axes.set_visible(False)
    figure.suptitle("Neural collapse per layer (lower = more collapsed)")
    return _save_atomically(figure, path)
