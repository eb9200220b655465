"""The last stage of `make demo`: the running service answering in- and out-of-distribution inputs.

Starts the real `ncguard serve` on a free loopback port, posts every row of the demo's npz file
(arrays `x` and `kind`, e.g. "id", "ood:noise"), prints one line per input, and stops the server
whatever happens.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import numpy as np

from ..client import ServicePredictions, local_server
from ..errors import DataError


def _read_inputs(npz_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            if "x" not in data.files or "kind" not in data.files:
                raise DataError(f"{npz_path} needs arrays 'x' and 'kind', has {sorted(data.files)}")
            x, kind = data["x"], data["kind"].astype(str)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {npz_path}: {exc}") from None
    if len(x) != len(kind):
        raise DataError(f"{npz_path}: 'x' has {len(x)} rows but 'kind' has {len(kind)}")
    return x, kind


def serve_and_query(model_path: str | os.PathLike, npz_path: str | os.PathLike) -> ServicePredictions:
    x, kind = _read_inputs(npz_path)
    print(f"\n$ ncguard serve {shlex.quote(str(model_path))} --port <free port>", flush=True)
    with local_server(model_path) as client:
        info = client.model_info()
        print(f"demo: {client.url} serves {info['name']} (score {info['score']}, threshold {info['threshold']:.4g})")
        print(f"demo: POST {client.url}/predict with {len(x)} inputs from {Path(npz_path).name}\n")
        answer = client.predict(x)
    print(f"{'kind':<14} {'label':<16} {'confidence':>10} {'ood score':>10}  decision")
    for k, label, confidence, score, flagged in zip(kind, answer.labels, answer.confidence, answer.ood_score, answer.is_ood):
        print(f"{k:<14} {label:<16} {confidence:>10.3f} {score:>10.4f}  {'OOD' if flagged else 'in-distribution'}")
    print("\ndemo: the server was stopped.")
    return answer
