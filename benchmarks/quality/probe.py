"""The transfer probe: how well a model's layers serve tasks it never trained on (issue 16).

Two linear probes (logistic regression on standardized features), per layer, on the same cached
features of the probe images (one forward pass per model):

- The full probe (`probe_digits`): all 1,797 scikit-learn digits, cross-validated. It saturates: with
  ~1,400 labelled digits per fold even raw pixels score above 0.9 and both heads' h land within about
  a point of each other, so it cannot show whether the transfer layer transfers better. It stays as
  the second row, the "enough labels" end of the scale.
- The few-shot probe (`few_shot_probe`): 10 labelled images per class, every other image of the set
  as the test, averaged over 50 random draws (fixed seeds). With 100 training images a probe only
  does well when the layer already separates the new classes, so there is headroom in which a better
  transfer layer shows. It runs on two tasks: the digits again and the glyph letters A-J the benchmark
  draws as a far-OOD set (benchmarks/quality/ood_sets.py), rendered here with their labels.

The draws depend only on the task's labels and the seed, never on the model, so every model meets
the same 50 training sets: the difference between two models is a paired difference per draw, and
its standard error (`paired_difference`) is smaller than either model's own.
"""

from __future__ import annotations

import time

import numpy as np

from ncguard.data import load_dataset

from .ood_sets import GLYPH_LETTERS, SIDE, font_files, render_glyph

BLOCKS = ("block1", "block2", "block3")
PROBE_LAYERS = ("transfer", "detection", *BLOCKS)
# Inside the backbone's head (SmallCNN: pool to a grid, Linear, BatchNorm, ReLU -> h): where transfer is lost.
HEAD_PROBES = ("grid", "transfer-preact")
# Both probes read the same layers: the scored ones, the head's inner ones and the raw-pixel floor.
ALL_PROBE_LAYERS = (*PROBE_LAYERS, *HEAD_PROBES, "pixels")
SHOTS = 10  # labelled images per class
DRAWS = 50  # random draws of those images; the mean's standard error over draws is reported
FEW_SHOT_SEED = 0
GLYPHS_PER_LETTER = 150  # about the digits' 180 per class
GLYPH_SEED = 16  # not the far-OOD set's seed 0: these are other renderings of the same recipe


def digits_task() -> tuple[np.ndarray, np.ndarray]:
    """(x [1797, 1, 28, 28], y): all of scikit-learn's digits, upscaled as the far-OOD `digits` set is."""
    from ncguard.ood_data import fit_to_shape

    splits = [load_dataset(f"digits:{split}") for split in ("train", "test")]
    x = fit_to_shape(np.concatenate([d.x for d in splits]), (1, SIDE, SIDE), "digits")
    return x, np.concatenate([d.y for d in splits])


def glyph_task(per_letter: int = GLYPHS_PER_LETTER, seed: int = GLYPH_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(x [10 * per_letter, 1, 28, 28], y): labelled glyph letters, `per_letter` renderings of each of A-J.

    Rendered as `ood_sets.glyph_images` renders them (random font, size and offset; a font without the
    letter is redrawn); renderings of a letter that already has `per_letter` are dropped, so the
    classes are balanced. y[i] indexes GLYPH_LETTERS.
    """
    fonts = font_files()
    if not fonts:
        raise RuntimeError("no TrueType fonts found in matplotlib's data folder")
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(GLYPH_LETTERS), dtype=np.int64)
    images, labels = [], []
    while len(images) < per_letter * len(GLYPH_LETTERS):
        glyph = np.zeros((SIDE, SIDE), dtype=np.float32)
        while glyph.max() == 0.0:  # a font without the letter draws nothing: draw again
            glyph, letter = render_glyph(rng, fonts)
        if counts[letter] < per_letter:
            counts[letter] += 1
            images.append(glyph)
            labels.append(letter)
    return np.stack(images)[:, None].astype(np.float32), np.asarray(labels, dtype=np.int64)


def probe_tasks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{task: (images, labels)} of the few-shot probe; the full probe uses "digits"."""
    return {"digits": digits_task(), "glyphs": glyph_task()}


def probe_features(model, x: np.ndarray, desc: str) -> dict[str, np.ndarray]:
    """{layer: features} of the probe images: the scored layers, the head's inner layers and the pixels."""
    from training.inference import collect_layer_features

    features = collect_layer_features(model, x, PROBE_LAYERS, desc=desc)
    features.update(_head_inputs(model, x))
    features["pixels"] = x.reshape(len(x), -1)
    return features


def _one_blas_thread():
    """A context in which NumPy's and scikit-learn's BLAS use one thread.

    The probe fits are small (100 rows for the few-shot probe); with its default two threads OpenBLAS
    spent most of a fit waiting for a core, and on the benchmark's 2 shared cores the few-shot probe
    took minutes per layer instead of about a second.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _new_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def probe_digits(model, folds: int, seed: int = 0, features: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Full linear-probe accuracy on scikit-learn digits (a task never trained on), per layer.

    Besides the scored layers: "pixels" (the raw input, the floor), "grid" (the pooled block3 grid the
    head's Linear reads) and "transfer-preact" (h before the head's final ReLU), which locate the
    layer where a model's features stop transferring.

    Accuracy is the mean over `folds` stratified folds of all 1,797 digits: one 40% split of
    the 1,347 training digits had a binomial standard error near 0.7 points, as large as the
    differences the study looks for; scoring every digit once brings it near 0.3. With that many
    labels the probe saturates (pixels alone score above 0.9): `few_shot_probe` is the one with headroom.
    `features`: the digits' probe features when the caller already has them (`probe_features`).
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x, y = digits_task()
    if features is None:
        features = probe_features(model, x, "features of the probe task")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with _one_blas_thread():
        return {layer: float(cross_val_score(_new_probe(), features[layer], y, cv=splitter).mean()) for layer in ALL_PROBE_LAYERS if layer in features}


def few_shot_draws(y: np.ndarray, shots: int = SHOTS, draws: int = DRAWS, seed: int = FEW_SHOT_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(training rows, test rows)] * draws: `shots` rows of every class, drawn without replacement;
    the test rows are all the others. Depends only on y and the seed, so every model gets the same draws."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    if min(len(rows) for rows in by_class) <= shots:
        raise ValueError(f"every class needs more than {shots} rows for a {shots}-shot probe with a test set")
    out = []
    for _ in range(draws):
        train = np.sort(np.concatenate([rng.choice(rows, size=shots, replace=False) for rows in by_class]))
        test = np.setdiff1d(np.arange(len(y)), train, assume_unique=True)
        out.append((train, test))
    return out


def few_shot_accuracies(features: np.ndarray, y: np.ndarray, draws: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Test accuracy of a probe fitted on each draw's training rows (scaler included), one per draw."""
    accuracies = np.empty(len(draws))
    with _one_blas_thread():
        for i, (train, test) in enumerate(draws):
            probe = _new_probe().fit(features[train], y[train])
            accuracies[i] = probe.score(features[test], y[test])
    return accuracies


def summarize(accuracies) -> dict:
    """{"mean", "se" (standard error of the mean over draws), "draws" (every draw's accuracy)}."""
    accuracies = np.asarray(accuracies, dtype=np.float64)
    se = float(accuracies.std(ddof=1) / np.sqrt(len(accuracies))) if len(accuracies) > 1 else 0.0
    return {"mean": float(accuracies.mean()), "se": se, "draws": [float(a) for a in accuracies]}


def few_shot_probe(features_by_task: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
                   shots: int = SHOTS, draws: int = DRAWS, seed: int = FEW_SHOT_SEED) -> dict:
    """Few-shot linear probe per task and layer: {"shots", "draws", "seed", "tasks": {task: {"n",
    "classes", "layers": {layer: summarize(...)}}}}.

    `shots` labelled images per class train a logistic regression on features standardized on those
    images; every other image of the task is its test; mean test accuracy over `draws` draws.
    Why few-shot: the full probe (`probe_digits`) saturates (pixels above 0.9, the heads' h within about a
    point), so it cannot show a transfer layer's advantage; with 10 images per class the features have to
    do the work, and the models spread apart.
    """
    tasks = {}
    for task, features in features_by_task.items():
        y = labels[task]
        task_draws = few_shot_draws(y, shots, draws, seed)
        layers = {layer: summarize(few_shot_accuracies(features[layer], y, task_draws)) for layer in ALL_PROBE_LAYERS if layer in features}
        tasks[task] = {"n": int(len(y)), "classes": int(len(np.unique(y))), "layers": layers}
    return {"shots": shots, "draws": draws, "seed": seed, "tasks": tasks}


def transfer_probes(model, folds: int) -> tuple[dict[str, float], dict]:
    """(full probe on digits, few-shot probe on digits and glyphs) of one model, from one forward pass
    per task; the few-shot result records its own time under "seconds"."""
    started = time.perf_counter()
    tasks = probe_tasks()
    features = {task: probe_features(model, x, f"features of the {task} probe") for task, (x, _) in tasks.items()}
    full = probe_digits(model, folds, features=features["digits"])
    few_started = time.perf_counter()
    few = few_shot_probe(features, {task: y for task, (_, y) in tasks.items()})
    few["seconds"] = time.perf_counter() - few_started
    few["probe_seconds"] = time.perf_counter() - started
    return full, few


def paired_difference(ours: list[float], plain: list[float]) -> dict:
    """Ours minus plain per draw (the same draws, so paired), in accuracy: {"mean", "se"}."""
    summary = summarize(np.asarray(ours, dtype=np.float64) - np.asarray(plain, dtype=np.float64))
    return {"mean": summary["mean"], "se": summary["se"]}


def _head_inputs(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """{"grid": input of the head's Linear, "transfer-preact": input of its final ReLU if it has one}; {} for other heads."""
    import torch
    from torch import nn

    head = getattr(model.backbone, "head", None)
    modules = list(head) if isinstance(head, nn.Sequential) else []
    linear = next((m for m in modules if isinstance(m, nn.Linear)), None)
    if linear is None:
        return {}
    captured: dict[str, torch.Tensor] = {}
    hooks = [linear.register_forward_hook(lambda module, inputs, output: captured.__setitem__("grid", inputs[0]))]
    if isinstance(modules[-1], nn.ReLU):  # a pre-hook: the ReLU works in place, so afterwards its input is rectified
        hooks.append(modules[-1].register_forward_pre_hook(lambda module, inputs: captured.__setitem__("transfer-preact", inputs[0].clone())))
    try:
        with torch.no_grad():
            model.eval()
            model(torch.from_numpy(x))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: value.numpy() for name, value in captured.items()}
