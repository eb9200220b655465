"""The in-process paths of the serving benchmark: raw ONNX Runtime, the graph without its OOD part,
and `ncguard predict`, each timed call by call on the same inputs.

The raw session is the ceiling every other path is compared with: the exported graph run by a bare
`InferenceSession` with the session options `ncguard.runtime.open_session` gives every path, no
checks, no post-processing. The graph without the OOD part is the same file cut down to
logits + probabilities + features (onnx.utils.Extractor), so raw / stripped - 1 is what the OOD score
adds to the graph. Rounds of the two graphs alternate, so a neighbour's load on the shared cores
falls on both alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ncguard.model_file import INPUT_NAME, OUTPUT_NAMES, load_model
from ncguard.runtime import open_session

WITHOUT_OOD = tuple(name for name in OUTPUT_NAMES if name != "ood_score")


def summarize(latencies: list[float], rows_per_call: int, elapsed: float) -> dict:
    """p50/p99 per call (ms) and rows per second over the whole timed span."""
    values = np.asarray(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p99_ms": round(float(np.percentile(values, 99)), 4),
        "calls": len(values),
        "rows_per_s": round(len(values) * rows_per_call / elapsed, 1),
    }


def time_calls(call: Callable[[], object], *, calls: int, budget_s: float) -> tuple[list[float], float]:
    """Per-call latencies of `call`, at most `calls` of them and stopping after `budget_s` seconds."""
    latencies = []
    start = time.perf_counter()
    deadline = start + budget_s
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        if t1 > deadline:
            break
    return latencies, time.perf_counter() - start


def stripped_graph(serialized: bytes) -> bytes:
    """The exported graph with only logits, probabilities and features as outputs (no OOD score)."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load_from_string(serialized)
    cut = Extractor(model).extract_model([INPUT_NAME], list(WITHOUT_OOD))
    names = {output for node in cut.graph.node for output in node.output}
    if "ood_score" in names:  # the OOD part must really be gone, or the comparison means nothing
        raise RuntimeError("the stripped graph still computes ood_score")
    return cut.SerializeToString()


def bench_graphs(model: Path, batches: list[int], *, calls: int, budget_s: float, rounds: int) -> dict:
    """Raw session (all outputs) and the stripped graph, alternating rounds, per batch size."""
    serialized = load_model(model).serialized
    full = open_session(serialized, provider="cpu")
    stripped_bytes = stripped_graph(serialized)
    cut = open_session(stripped_bytes, provider="cpu")
    import onnx

    nodes_full = len(onnx.load_from_string(serialized).graph.node)
    nodes_cut = len(onnx.load_from_string(stripped_bytes).graph.node)
    shape = tuple(load_model(model).metadata.input_shape)
    rng = np.random.default_rng(0)
    result = {"raw_onnxruntime": {}, "graph_without_ood": {}, "nodes": {"full": nodes_full, "without_ood": nodes_cut}}
    for batch in batches:
        x = rng.uniform(0, 1, size=(batch, *shape)).astype(np.float32)
        runs = {"raw_onnxruntime": lambda: full.run(list(OUTPUT_NAMES), {INPUT_NAME: x}), "graph_without_ood": lambda: cut.run(list(WITHOUT_OOD), {INPUT_NAME: x})}
        for run in runs.values():  # warm-up: first calls allocate
            for _ in range(10):
                run()
        samples = {name: ([], 0.0) for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                latencies, elapsed = time_calls(run, calls=max(1, calls // rounds), budget_s=budget_s / rounds)
                samples[name] = (samples[name][0] + latencies, samples[name][1] + elapsed)
        for name, (latencies, elapsed) in samples.items():
            result[name][str(batch)] = summarize(latencies, batch, elapsed)
    return result


def bench_predict_cli(model: Path, batches: list[int], *, calls: int, budget_s: float) -> dict:
    """`ncguard predict` as its command runs it: read an .npz, score, build rows, format the table.

    The model is loaded once (a long-lived caller's cost); `command_s` is one whole cold command,
    process start and model load included, for batch 64.
    """
    import subprocess
    import sys

    from ncguard.predict_cli import format_table, gather_inputs, prediction_rows
    from ncguard.runtime import Predictor

    predictor = Predictor(model, provider="cpu")
    shape = tuple(predictor.metadata.input_shape)
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    result = {}
    for batch in batches:
        path = folder / f"x{batch}.npz"
        np.savez(path, x=rng.uniform(0, 1, size=(batch, *shape)).astype(np.float32))

        def run(path=path):
            return format_table(prediction_rows(predictor, gather_inputs([str(path)], shape)))

        for _ in range(5):
            run()
        latencies, elapsed = time_calls(run, calls=calls, budget_s=budget_s)
        result[str(batch)] = summarize(latencies, batch, elapsed)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ncguard", "predict", str(model), str(folder / f"x{max(batches)}.npz"), "--provider", "cpu"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ncguard predict failed: {done.stderr[-2000:]}")
    result["command_s"] = {"batch": max(batches), "seconds": round(time.perf_counter() - start, 3)}
    return result
