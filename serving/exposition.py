"""/metrics: every live worker's metrics of this server, and nothing else.

Where the values live. prometheus-client's multiprocess mode keeps each worker's values in files
named after its pid in one directory, and a scrape (answered by any worker) merges the files.
BentoML puts that directory under $BENTOML_HOME and empties it when a server starts, so a second
server on the same machine wiped the first one's counters and then exported its own. Each server
gets a directory of its own instead: `ncguard serve` makes one per run (NCGUARD_METRICS_DIR) and
removes it at exit; a service started some other way (`bentoml serve` of a Bento) uses one keyed
by the pid of the process that started its workers, which its workers share and no other server does.

Dead workers. Window gauges (OOD rate, PSI, KS, ...) are per worker and merged as `livemax`, which
drops a worker's file only through `mark_process_dead`, and a SIGKILLed or crashed worker never
runs it: its last window stayed in /metrics for good and kept alerts firing. So every scrape
first marks the workers whose process is gone (or a zombie) as dead. Counters and histograms of a
dead worker stay: a counter must not go backwards because a worker died.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path

METRICS_DIR_ENV = "NCGUARD_METRICS_DIR"
_PID_IN_NAME = re.compile(r"_(\d+)\.db$")


def metrics_directory(environ=None) -> Path:
    """This server's multiprocess directory: $NCGUARD_METRICS_DIR, else one shared by the workers' parent's children."""
    environ = os.environ if environ is None else environ
    configured = environ.get(METRICS_DIR_ENV, "").strip()
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / f"ncguard-metrics-{os.getppid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def use_metrics_directory(path: Path) -> None:
    """Make prometheus-client write this process's values under `path` (call before any metric is created)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def forget_dead_workers(path: Path) -> list[int]:
    """Drop the live-mode gauge files of workers that are no longer running; returns their pids."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for name in glob.glob(os.path.join(path, "*.db")) if (m := _PID_IN_NAME.search(name))}
    dead = sorted(pid for pid in pids if pid != os.getpid() and not _alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(path))
    return dead


def exposition(path: Path) -> tuple[bytes, str]:
    """The Prometheus text of every live worker's metrics under `path`, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    forget_dead_workers(path)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return generate_latest(registry), CONTENT_TYPE_LATEST
