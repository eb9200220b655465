"""The in-process paths of the serving benchmark: raw ONNX Runtime, the graph without its OOD part,
and `ncguard predict`, each timed call by call on the same inputs.

The raw session is the ceiling every other path is compared with: the exported graph run by a bare
`InferenceSession` with the session options `ncguard.runtime.open_session` gives every path, no
checks, no post-processing. The graph without the OOD part is the same file cut down to
logits + probabilities + features (onnx.utils.Extractor), so raw / stripped - 1 is what the OOD score
adds to the graph. The two graphs alternate call by call, so a neighbour's load on the shared
cores falls on both alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ncguard.model_file import INPUT_NAME, OUTPUT_NAMES, load_model
from ncguard.runtime import open_session, session_options

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


def paired_latencies(runs, *, calls: int, budget_s: float) -> tuple[list[float], list[float]]:
    """Per-call seconds of two callables, run back to back in alternation (the order swapping every
    time, after 10 warm-up calls each), so load from other processes falls on both alike; at most
    `calls` pairs, stopping after `budget_s` seconds."""
    for run in runs:  # warm-up: first calls allocate
        for _ in range(10):
            run()
    samples: tuple[list[float], list[float]] = ([], [])
    deadline = time.perf_counter() + budget_s
    for i in range(calls):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            runs[k]()
            samples[k].append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return samples


def median_ratio(samples: tuple[list[float], list[float]]) -> float:
    """The median over pairs of the first callable's time over the second's (`paired_latencies`' samples)."""
    return float(np.median(np.asarray(samples[0]) / np.asarray(samples[1])))


class GraphPair:
    """An exported model's graph and the same graph without its OOD part (`stripped_graph`), each in
    its own session: what `ood_wall_cost` and `bench_graphs` time call by call against each other."""

    def __init__(self, model: Path):
        loaded = load_model(model)
        self.serialized, self.stripped = loaded.serialized, stripped_graph(loaded.serialized)
        self.full, self.cut = open_session(self.serialized, provider="cpu"), open_session(self.stripped, provider="cpu")
        self.shape = tuple(loaded.metadata.input_shape)

    def runs_by_batch(self, batches: list[int]):
        """(batch, (run the full graph, run the stripped graph)) on one uniform-noise input per batch size."""
        rng = np.random.default_rng(0)
        for batch in batches:
            x = rng.uniform(0, 1, size=(batch, *self.shape)).astype(np.float32)
            yield batch, (lambda x=x: self.full.run(list(OUTPUT_NAMES), {INPUT_NAME: x}), lambda x=x: self.cut.run(list(WITHOUT_OOD), {INPUT_NAME: x}))


def ood_wall_cost(model: Path, batches: list[int], *, calls: int, budget_s: float) -> dict[int, float]:
    """Per batch: the wall-clock cost of the OOD part, the median over paired calls of the exported
    graph's time over the same graph without it (`stripped_graph`), minus 1. What a caller waits for,
    where `ood_node_share`'s profiler also charges every node its own few microseconds."""
    return {batch: median_ratio(paired_latencies(runs, calls=calls, budget_s=budget_s)) - 1.0
            for batch, runs in GraphPair(model).runs_by_batch(batches)}


WALL_BUDGET_S = 20.0  # per batch size, for `ood_cost_both_ways`'s paired wall-clock calls


def ood_cost_both_ways(model: Path, batches: list[int], *, calls: int, wall_budget_s: float = WALL_BUDGET_S) -> dict[str, dict]:
    """Per batch (keyed as a string): `ood_node_share`'s profiler figures plus "wall_adds", `ood_wall_cost`'s
    wall-clock share; the two measures every OOD-cost benchmark reports side by side."""
    shares = ood_node_share(model, batches, calls=calls)
    wall = ood_wall_cost(model, batches, calls=calls, budget_s=wall_budget_s)
    return {str(batch): {**shares[str(batch)], "wall_adds": wall[batch]} for batch in batches}


def bench_graphs(model: Path, batches: list[int], *, calls: int, budget_s: float, threads: int = 8) -> dict:
    """Raw session (all outputs) and the stripped graph, call by call in alternation, per batch size.

    Each iteration runs both graphs back to back (the order swapping every time), so load from
    other processes falls on both alike; "paired_median_ratio" is the median of their ratios. The raw session is also
    run from `threads` caller threads at once, to show what concurrency alone gains on this machine.
    """
    import onnx

    pair = GraphPair(model)
    result = {
        "raw_onnxruntime": {},
        "graph_without_ood": {},
        f"raw_onnxruntime_{threads}_threads": {},
        "paired_median_ratio": {},
        "nodes": {"full": len(onnx.load_from_string(pair.serialized).graph.node), "without_ood": len(onnx.load_from_string(pair.stripped).graph.node)},
    }
    for batch, runs in pair.runs_by_batch(batches):
        samples = paired_latencies(runs, calls=calls, budget_s=budget_s)
        for name, latencies in zip(("raw_onnxruntime", "graph_without_ood"), samples):
            result[name][str(batch)] = summarize(latencies, batch, float(np.sum(latencies)))
        result["paired_median_ratio"][str(batch)] = round(median_ratio(samples), 4)
        result[f"raw_onnxruntime_{threads}_threads"][str(batch)] = _threaded(runs[0], batch, threads=threads, calls=calls, budget_s=budget_s / 2)
    return result


def _threaded(run: Callable[[], object], batch: int, *, threads: int, calls: int, budget_s: float) -> dict:
    """`run` from several threads at once (ONNX Runtime releases the GIL): rows/s over the span."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        parts = list(pool.map(lambda _: time_calls(run, calls=max(1, calls // threads), budget_s=budget_s)[0], range(threads)))
        elapsed = time.perf_counter() - start
    return summarize([v for part in parts for v in part], batch, elapsed)


def bench_predict_cli(model: Path, batches: list[int], *, calls: int, budget_s: float) -> dict:
    """`ncguard predict` as its command runs it: read an .npz, score, build rows, format the table.

    The model is loaded once (a long-lived caller's cost); `command_s` is one whole cold command,
    process start and model load included, for batch 64.
    """
    import subprocess
    import sys

    from ncguard.cli.predict import format_table, gather_inputs, prediction_rows
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


def _ood_only_nodes(graph) -> set[str]:
    """Nodes of a graph that no output but ood_score needs (a backward walk from the other outputs)."""
    producer = {output: node for node in graph.node for output in node.output}
    needed, stack = set(), list(WITHOUT_OOD)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            stack.extend(node.input)
    return {node.name for node in graph.node} - needed


def ood_node_share(model: Path, batches: list[int], *, calls: int) -> dict:
    """Per batch: the OOD-only nodes' share of the graph's node time, from ONNX Runtime's profiler.

    The nodes that only the OOD score needs are the OOD part; their summed kernel time over the
    whole graph's, both from the same calls, does not depend on how busy the machine was between
    calls (the weakness of comparing two timed sessions on shared cores). They are found in the graph
    ONNX Runtime actually runs (saved with optimized_model_filepath), because its fusions rename
    nodes (a Transpose + MatMul becomes one FusedMatMul) and add layout reorders: matching the
    exported graph's node names would miss those. At batch 1 the share includes each small kernel's
    fixed launch cost, which is most of what a small node costs there.
    """
    import json as _json

    import onnx
    import onnxruntime as ort

    serialized = load_model(model).serialized
    shape = tuple(load_model(model).metadata.input_shape)
    rng = np.random.default_rng(0)
    shares = {}
    for batch in batches:
        folder = Path(tempfile.mkdtemp(prefix="bench-profile-"))
        options = session_options()  # open_session's options plus the profiler
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / "ort")
        options.optimized_model_filepath = str(folder / "optimized.onnx")
        options.log_severity_level = 3  # saving a layout-optimized graph warns that it is machine-specific
        session = ort.InferenceSession(serialized, sess_options=options, providers=["CPUExecutionProvider"])
        ood_nodes = _ood_only_nodes(onnx.load(str(folder / "optimized.onnx")).graph)
        x = rng.uniform(0, 1, size=(batch, *shape)).astype(np.float32)
        for _ in range(calls):
            session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        events = _json.loads(Path(session.end_profiling()).read_text())
        node_time = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                name = event["name"][: -len("_kernel_time")]
                node_time[name] = node_time.get(name, 0) + event["dur"]
        ood = sum(t for n, t in node_time.items() if n in ood_nodes)
        shares[str(batch)] = {
            "ood_share": round(ood / sum(node_time.values()), 4),
            "ood_adds": round(ood / (sum(node_time.values()) - ood), 4),  # relative to the graph without it
            "ood_us": round(ood / calls, 1),  # kernel microseconds per call (profiler clock)
            "rest_us": round((sum(node_time.values()) - ood) / calls, 1),
            "ood_nodes": sorted(ood_nodes),
        }
    return shares


class RawReference:
    """The raw session at one batch size, re-measured for a moment between other cells.

    Load on a shared machine drifts over a run of several minutes; ratios to a raw figure taken
    minutes earlier would carry that drift. `sample()` takes `seconds` of back-to-back calls now;
    `rows_per_s` is the median of every sample so far.
    """

    def __init__(self, model: Path, batch: int, seconds: float = 1.0):
        loaded = load_model(model)
        self.session = open_session(loaded.serialized, provider="cpu")
        self.x = np.random.default_rng(2).uniform(0, 1, size=(batch, *loaded.metadata.input_shape)).astype(np.float32)
        self.seconds = seconds
        self.samples: list[float] = []
        for _ in range(5):
            self._run()

    def _run(self) -> None:
        self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: self.x})

    def sample(self) -> float:
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < self.seconds:
            self._run()
            calls += 1
        self.samples.append(calls * len(self.x) / (time.perf_counter() - start))
        return self.samples[-1]

    @property
    def rows_per_s(self) -> float:
        return float(np.median(self.samples))
