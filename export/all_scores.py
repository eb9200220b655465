"""Every OOD score of `ncguard.scores` on one run's features, for `ncguard evaluate --all-scores RUN_DIR`.

The features come from the run's torch model (one pass per data set over every layer the detectors
read); each detector is built and fitted exactly as the exporter does (`ncguard.scores.build_detector`,
`training.inference.fit_on_held_out`: "fused" standardized on the run's held-out split), and scored
with the NumPy reference. "fused" is included with its default components when the run's statistics
hold a conv block to fuse with the detection layer. Uses torch.
"""

from __future__ import annotations

import numpy as np

from ncguard.errors import ConfigError, NcguardError
from ncguard.scores import SCORE_NAMES, Fused, build_detector

BATCH_SIZE = 512


def score_every_detector(run_dir: str, id_x: np.ndarray, ood_inputs: dict[str, np.ndarray]):
    """({score: ID scores}, {score: {OOD set: scores}}, {score: why it was skipped})."""
    import torch

    from training.inference import collect_layer_features, fit_on_held_out
    from training.runs import calibration_inputs, load_run

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, config, bundle = load_run(run_dir)
    held_out_x, _ = calibration_inputs(config)
    detectors, skipped = {}, {}
    for name in SCORE_NAMES:
        try:  # e.g. statistics fitted without what this score needs
            detector = build_detector(name, bundle)
            if name == Fused.name and len(detector.components) < 2:
                raise ConfigError("the run's statistics hold no conv block layer to fuse with the detection layer")
            detectors[name] = fit_on_held_out(detector, bundle, model, held_out_x)
        except NcguardError as exc:
            skipped[name] = str(exc)
    layers = tuple(dict.fromkeys(layer for detector in detectors.values() for layer in detector.layers))
    features = {
        set_name: collect_layer_features(model, x, layers, batch_size=BATCH_SIZE, desc=f"features of {set_name}")
        for set_name, x in {"ID": id_x, **ood_inputs}.items()
    }
    id_scores = {name: detector.score(features["ID"]) for name, detector in detectors.items()}
    ood_scores = {name: {set_name: detector.score(features[set_name]) for set_name in ood_inputs} for name, detector in detectors.items()}
    return id_scores, ood_scores, skipped
