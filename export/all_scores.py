"""Every OOD score of `ncguard.scores` on one run's features, for `ncguard evaluate --all-scores RUN_DIR`.

The features come from the run's torch model (one pass per data set over the layers the scores
read, plus the logits); each detector is fitted from the run's statistics exactly as the exporter
fits it (export.detectors), and scored with the NumPy reference. "fused" is included with its
default components when the run's statistics hold them: its mu and sigma come from the run's
held-out calibration split, as at export. Uses torch.
"""

from __future__ import annotations

import numpy as np

from export.detectors import FUSED, fit_detector, fused_components
from ncguard.errors import ConfigError, NcguardError
from ncguard.scores import SCORES

BATCH_SIZE = 512


def _layer_features(model, x: np.ndarray, layers: tuple[str, ...], name: str) -> dict[str, np.ndarray]:
    from training.inference import collect_layer_features

    return collect_layer_features(model, x, layers, batch_size=BATCH_SIZE, desc=f"features of {name}")


def score_every_detector(run_dir: str, id_x: np.ndarray, ood_inputs: dict[str, np.ndarray]):
    """({score: ID scores}, {score: {OOD set: scores}}, {score: why it was skipped})."""
    import torch

    from training.runs import load_run

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, config, bundle = load_run(run_dir)
    detectors, skipped = {}, {}
    for name in sorted(SCORES):
        try:
            detectors[name] = fit_detector(name, bundle)
        except NcguardError as exc:  # e.g. statistics fitted without what this score needs
            skipped[name] = str(exc)
    try:
        fused = _fit_fused(model, config, bundle)
        detectors[FUSED] = (fused, fused.layers_)
    except NcguardError as exc:  # e.g. a run whose statistics hold no conv block
        skipped[FUSED] = str(exc)
    read = set()
    for _, layer in detectors.values():
        read.update(layer if isinstance(layer, tuple) else [layer] if layer else [])
    layers = tuple(sorted(read | {"logits"}))
    sets = {"ID": id_x, **ood_inputs}
    features = {set_name: _layer_features(model, x, layers, set_name) for set_name, x in sets.items()}

    def scores(name: str, set_name: str) -> np.ndarray:
        detector, layer = detectors[name]
        values = features[set_name]
        if isinstance(layer, tuple):
            return detector.score_layers(values, values["logits"])
        return detector.score(features=values[layer] if layer else None, logits=values["logits"])

    id_scores = {name: scores(name, "ID") for name in detectors}
    ood_scores = {name: {set_name: scores(name, set_name) for set_name in ood_inputs} for name in detectors}
    return id_scores, ood_scores, skipped


def _fit_fused(model, config: dict, bundle):
    """The fused score with its default components, standardized on the run's held-out ID split, as at export."""
    from export.cli import calibration_inputs
    from export.torch_export import fit_fused_on_held_out

    if len(fused_components(bundle)) < 2:
        raise ConfigError("the run's statistics hold no conv block layer to fuse with the detection layer")
    calibration_x, _ = calibration_inputs(config)
    return fit_fused_on_held_out(model, bundle, calibration_x)
