"""Reliability benchmark: `python -m benchmarks.reliability --model MODEL.onnx [--size full|smoke] [--out DIR]`.

Tries the service as an outside tester would, against real `ncguard serve` processes on 127.0.0.1
only, every part bounded in requests and seconds:
- fuzz: schemathesis on the published OpenAPI document, plus generated .npy headers (hypothesis),
  counting requests and their 2xx / 4xx / 5xx answers;
- kill: `hey` at 32 clients of 1-row requests against 2 workers, one of them SIGKILLed half-way:
  failed requests, how long until both workers serve again, and whether the dead worker's
  gauges left /metrics (and the live ones are still there) once the load is over;
- memory: a worker's RSS while 8 bodies of the maximum size (16 MiB) arrive at once (numbers and
  empty lists, each refused) and after;
- cardinality: /metrics size before and after 1,000 distinct unknown paths;
- side by side: two servers on one $BENTOML_HOME, each with its own counters.
Writes DIR/reliability.{json,md} (default benchmarks/results). Not a test; tests/test_serving_faults.py
and tests/test_serving_api.py run smaller versions of each part in `make test`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from ncguard.atomic import atomic_write
from ncguard.client import local_server
from ncguard.data import load_dataset
from ncguard.model_file import load_model

from . import probes

RESULTS = Path(__file__).resolve().parents[1] / "results"
SIZES = {
    "full": {"fuzz_examples": 150, "header_examples": 400, "kill_seconds": 60, "unknown_paths": 1000, "bodies": 8, "body_mib": 16},
    "smoke": {"fuzz_examples": 10, "header_examples": 30, "kill_seconds": 6, "unknown_paths": 100, "bodies": 2, "body_mib": 2},
}
GOALS = {"metrics_growth_bytes": 10_000, "rss_peak_mib": 300, "rss_after_mib": 50}


def _home() -> dict[str, str]:
    return {"BENTOML_HOME": tempfile.mkdtemp(prefix="reliability-bentoml-")}


def _count(statuses: list[int]) -> dict:
    return {
        "requests": len(statuses),
        "2xx": sum(200 <= s < 300 for s in statuses),
        "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses),
    }


def fuzz(url: str, shape: tuple[int, ...], size: dict) -> dict:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    statuses: list[int] = []
    schema = schemathesis.openapi.from_url(f"{url}/docs.json")
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in ("/predict", "/predict_image", "/model"):
            continue

        @settings(max_examples=size["fuzz_examples"], deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            statuses.append(case.call(base_url=url, timeout=30).status_code)

        run()
    openapi = _count(statuses)

    header_statuses: list[int] = []
    dims = st.one_of(st.integers(0, 4), st.integers(0, 2**63), st.just(shape[0] if shape else 1))
    descr = st.one_of(st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|b1", "O", "<U3", "f4,(2,3", "(100000000000,)f4", "V8", "<M8[s]"]), st.text(max_size=12))
    header = st.fixed_dictionaries({"descr": descr, "fortran_order": st.booleans(), "shape": st.lists(dims, max_size=70).map(tuple)})

    @settings(max_examples=size["header_examples"], deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(header=header, payload=st.binary(max_size=512))
    def headers(header, payload):
        text = repr(header).encode("latin1", errors="replace")
        text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
        body = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload
        response = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/x-npy"}, timeout=30)
        header_statuses.append(response.status_code)

    headers()
    return {"openapi": openapi, "npy_headers": _count(header_statuses)}


def kill_under_load(model: Path, size: dict) -> dict:
    hey = shutil.which("hey")
    if hey is None:
        raise SystemExit("the kill part needs `hey` (Debian: apt-get install hey)")
    x = load_dataset("digits:test").x.astype(np.float32)[:1]
    body = Path(tempfile.mkstemp(suffix=".npy")[1])
    body.write_bytes(probes.npy_bytes(x))
    seconds = size["kill_seconds"]
    env = {**_home(), "NCGUARD_DRIFT_WINDOW": "200", "NCGUARD_DRIFT_MIN_SAMPLES": "50"}
    with local_server(model, workers=2, env=env) as client:
        command = [hey, "-z", f"{seconds}s", "-c", "32", "-m", "POST", "-T", "application/x-npy", "-D", str(body), f"{client.url}/predict"]
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(seconds / 2)
        # the worker holding most of hey's connections: the one whose death the clients feel
        victim = max(probes.worker_processes(client), key=lambda p: sum(c.status == "ESTABLISHED" for c in p.net_connections("tcp")))
        connections = sum(c.status == "ESTABLISHED" for c in victim.net_connections("tcp"))
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        recovered_s = None
        while time.monotonic() - killed_at < 60:
            alive = probes.worker_processes(client)
            if len(alive) == 2 and all(p.pid != victim.pid for p in alive):
                recovered_s = round(time.monotonic() - killed_at, 2)
                break
            time.sleep(0.1)
        out, err = load.communicate(timeout=seconds + 120)
        statuses, failed_connections = _hey_summary(out)
        probes.post_rows(client.url, np.concatenate([load_dataset("digits:test").x.astype(np.float32)] * 2)[:800], 4)
        text = client.metrics()
        live = {p.pid for p in probes.worker_processes(client)}
        window_series = [name for name, _ in probes.metric_values(text, "ncguard_drift_window_samples")]
        stale = [name for name in window_series if f'pid="{victim.pid}"' in name]
        lost = [pid for pid in live if not any(f'pid="{pid}"' in name for name in window_series)]
    body.unlink(missing_ok=True)
    return {
        **_count(statuses),
        "client_errors": failed_connections,
        "victim_connections": connections,
        "seconds": seconds,
        "recovered_s": recovered_s,
        "stale_gauges": len(stale),
        "lost_gauges": len(lost),
        "ood_rate_after": max((v for _, v in probes.metric_values(text, "ncguard_ood_rate")), default=None),
    }


def _hey_summary(text: str) -> tuple[list[int], int]:
    """(one status per answered request, requests that got no answer) from hey's text summary."""
    statuses: list[int] = []
    errors = 0
    section = None
    for line in text.splitlines():
        if line.startswith("Status code distribution"):
            section = "status"
        elif line.startswith("Error distribution"):
            section = "errors"
        elif (match := re.match(r"\s*\[(\d+)\]\s+(\d+)", line)) and section == "status":
            statuses += [int(match.group(1))] * int(match.group(2))
        elif (match := re.match(r"\s*\[(\d+)\]", line)) and section == "errors":
            errors += int(match.group(1))
    return statuses, errors


def memory(model: Path, size: dict) -> dict:
    limit = size["body_mib"] * 1024 * 1024
    numbers = b'{"inputs": [' + b",".join([b"1e0"] * ((limit - 40) // 4)) + b"]}"
    lists = b'{"inputs": [' + b",".join([b"[]"] * ((limit - 40) // 3)) + b"]}"
    env = {**_home(), "NCGUARD_MAX_BODY_BYTES": str(limit)}
    mib = 1024 * 1024
    with local_server(model, env=env) as client:
        worker = probes.worker_processes(client)[0]
        before = worker.memory_info().rss
        peak = before

        def send(body: bytes) -> int:
            return httpx.post(f"{client.url}/predict", content=body, headers={"content-type": "application/json"}, timeout=300).status_code

        with ThreadPoolExecutor(size["bodies"]) as pool:
            half = size["bodies"] // 2
            futures = [pool.submit(send, body) for body in [numbers] * half + [lists] * (size["bodies"] - half)]
            while not all(f.done() for f in futures):
                peak = max(peak, worker.memory_info().rss)
                time.sleep(0.005)
            statuses = [f.result() for f in futures]
        time.sleep(1)
        after = worker.memory_info().rss
    return {"bodies": size["bodies"], "body_mib": size["body_mib"], "statuses": _count(statuses), "rss_before_mib": round(before / mib, 1), "peak_growth_mib": round((peak - before) / mib, 1), "after_growth_mib": round((after - before) / mib, 1)}


def cardinality(model: Path, size: dict) -> dict:
    with local_server(model, env=_home()) as client:
        httpx.get(f"{client.url}/nope-warm-up")  # the shared "other" series exists from the first one
        before = len(client.metrics().encode())
        started = time.perf_counter()
        with httpx.Client(base_url=client.url, timeout=30) as http:
            statuses = [http.get(f"/nope-{i}").status_code for i in range(size["unknown_paths"])]
        elapsed = time.perf_counter() - started
        text = client.metrics()
        t0 = time.perf_counter()
        client.metrics()
        scrape_ms = (time.perf_counter() - t0) * 1000
    return {"unknown_paths": size["unknown_paths"], "statuses": _count(statuses), "metrics_bytes_before": before, "metrics_bytes_after": len(text.encode()), "growth_bytes": len(text.encode()) - before, "paths_echoed": sum(f"nope-{i}" in text for i in range(size["unknown_paths"])), "scrape_ms": round(scrape_ms, 1), "seconds": round(elapsed, 1)}


def side_by_side(model: Path) -> dict:
    env = _home()
    x = load_dataset("digits:test").x.astype(np.float32)[:30]
    with local_server(model, env=env) as first:
        probes.post_rows(first.url, x, 10)
        with local_server(model, env=env) as second:
            probes.post_rows(second.url, x[:12], 4)
            counts = {"first": probes.metric_total(first.metrics(), "ncguard_predictions_total"), "second": probes.metric_total(second.metrics(), "ncguard_predictions_total")}
        counts["first_after_second_stopped"] = probes.metric_total(first.metrics(), "ncguard_predictions_total")
    return {"sent": {"first": 30, "second": 12}, "counted": counts, "kept_apart": counts == {"first": 30, "second": 12, "first_after_second_stopped": 30}}


def verdicts(report: dict) -> list[dict]:
    f, k, m, c = report["fuzz"], report["kill"], report["memory"], report["cardinality"]
    return [
        {"goal": "0 5xx in the fuzz", "value": f"{f['openapi']['5xx'] + f['npy_headers']['5xx']} of {f['openapi']['requests'] + f['npy_headers']['requests']}", "met": f["openapi"]["5xx"] + f["npy_headers"]["5xx"] == 0},
        {"goal": "0 lost and 0 stale gauges after a worker kill", "value": f"{k['lost_gauges']} lost, {k['stale_gauges']} stale", "met": k["lost_gauges"] == 0 and k["stale_gauges"] == 0},
        {"goal": f"/metrics grows by < {GOALS['metrics_growth_bytes']:,} bytes after {c['unknown_paths']:,} unknown paths", "value": f"{c['growth_bytes']:+,} bytes", "met": c["growth_bytes"] < GOALS["metrics_growth_bytes"]},
        {"goal": f"RSS under {m['bodies']} concurrent {m['body_mib']} MiB bodies grows < {GOALS['rss_peak_mib']} MiB, returns within {GOALS['rss_after_mib']} MiB", "value": f"peak {m['peak_growth_mib']:+.0f} MiB, after {m['after_growth_mib']:+.0f} MiB", "met": m["peak_growth_mib"] < GOALS["rss_peak_mib"] and m["after_growth_mib"] < GOALS["rss_after_mib"]},
        {"goal": "two servers on one BENTOML_HOME keep their own counters", "value": json.dumps(report["side_by_side"]["counted"]), "met": report["side_by_side"]["kept_apart"]},
    ]


def markdown(report: dict) -> str:
    f, k, m, c = report["fuzz"], report["kill"], report["memory"], report["cardinality"]
    lines = [
        "# Reliability",
        "",
        f"Model `{report['model']}`; {report['machine']}; {report['when']}; size {report['size']}. Written by `{report['command']}`.",
        "Every server is a real `ncguard serve` on 127.0.0.1 (1 worker unless said otherwise); every part is bounded in requests and time.",
        "",
        "| goal | measured | |",
        "| --- | --- | --- |",
        *[f"| {v['goal']} | {v['value']} | {'met' if v['met'] else 'NOT met'} |" for v in report["verdicts"]],
        "",
        "## Fuzz",
        "",
        "| source | requests | 2xx | 4xx | 5xx |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| schemathesis on /docs.json (/predict, /predict_image, /model) | {f['openapi']['requests']} | {f['openapi']['2xx']} | {f['openapi']['4xx']} | {f['openapi']['5xx']} |",
        f"| generated .npy headers (hypothesis) | {f['npy_headers']['requests']} | {f['npy_headers']['2xx']} | {f['npy_headers']['4xx']} | {f['npy_headers']['5xx']} |",
        "",
        "## A worker killed under load",
        "",
        f"`hey`, 32 clients of 1-row .npy requests for {k['seconds']} s against 2 workers; half-way, the worker holding most of "
        f"the clients' connections ({k['victim_connections']} of 32) SIGKILLed. "
        f"Requests: {k['requests']:,} answered ({k['2xx']:,} 2xx, {k['4xx']} 4xx, {k['5xx']} 5xx) and {k['client_errors']} without an answer "
        f"(requests in flight on the killed worker, or sent to it before the kernel dropped its connections). A new worker was up {k['recovered_s']} s after the kill. Afterwards, "
        f"with 800 in-distribution rows sent: {k['stale_gauges']} gauge series of the dead worker and {k['lost_gauges']} missing "
        f"for live workers; OOD-rate gauge {k['ood_rate_after']}.",
        "",
        "## Memory under maximum-size bodies",
        "",
        f"{m['bodies']} bodies of {m['body_mib']} MiB at once (half `1e0,...`, half `[],...`; answers {m['statuses']}): the worker's RSS "
        f"({m['rss_before_mib']} MiB before) peaked {m['peak_growth_mib']:+} MiB and was {m['after_growth_mib']:+} MiB one second after.",
        "",
        "## /metrics cardinality",
        "",
        f"{c['unknown_paths']:,} GETs of distinct unknown paths (answers {c['statuses']}): /metrics went from {c['metrics_bytes_before']:,} to "
        f"{c['metrics_bytes_after']:,} bytes; {c['paths_echoed']} paths appear in it; a scrape then took {c['scrape_ms']} ms.",
        "",
        "## Two servers side by side",
        "",
        f"Sent {report['side_by_side']['sent']}; counted {report['side_by_side']['counted']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported .onnx model (the tests use the digits model)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    model = Path(args.model)
    shape = tuple(load_model(model).metadata.input_shape)
    report: dict = {
        "model": str(model),
        "size": args.size,
        "machine": f"{os.cpu_count()} CPU cores",
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python -m benchmarks.reliability --model {model} --size {args.size}",
    }
    print("fuzz ...", flush=True)
    with local_server(model, env=_home()) as client:
        report["fuzz"] = fuzz(client.url, shape, size)
    print(f"  {report['fuzz']}\nkill a worker under load ...", flush=True)
    report["kill"] = kill_under_load(model, size)
    print(f"  {report['kill']}\nmemory ...", flush=True)
    report["memory"] = memory(model, size)
    print(f"  {report['memory']}\ncardinality ...", flush=True)
    report["cardinality"] = cardinality(model, size)
    print(f"  {report['cardinality']}\nside by side ...", flush=True)
    report["side_by_side"] = side_by_side(model)
    report["verdicts"] = verdicts(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "reliability.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out / "reliability.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
