"""`ncguard serve MODEL.onnx`: check the model and the options, then run BentoML's server.

Everything is checked before BentoML starts, so a wrong path, a foreign file or a busy port is a
one-line error, not a worker crash log. Options reach the workers as environment variables
(serving.settings), the same ones a Bento reads. Also runnable as `python -m serving.cli`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from ncguard.errors import ConfigError
from ncguard.model_file import load_model
from ncguard.runtime import PROVIDER_CHOICES
from ncguard.signing import verify_key_path

from . import settings as s
from .access import API_KEYS_FILE_ENV
from .exposition import METRICS_DIR_ENV

SERVICE_IMPORT = "serving.service:NcguardService"
ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the `serving` package


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `ncguard serve` (ncguard/cli registers the command; these are its flags)."""
    p.add_argument("model", help="exported .onnx model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own ONNX Runtime session")
    p.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES, help="ONNX Runtime execution provider")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per worker (default: CPU cores / workers)")
    p.add_argument("--max-batch-inputs", type=int, default=None, help=f"inputs allowed per request (default {s.DEFAULT_MAX_BATCH_INPUTS})")
    p.add_argument("--max-body-bytes", type=int, default=None, help=f"request body size limit (default {s.DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help="require an API key (one per line in FILE; or set NCGUARD_API_KEYS=KEY1,KEY2): "
                   "'Authorization: Bearer KEY' or 'X-API-Key: KEY' on every route but /livez, /readyz, /healthz")
    p.add_argument("--max-queue-rows", type=int, default=None,
                   help=f"rows a worker's batching queue holds before it answers 503 + Retry-After (default {s.DEFAULT_MAX_QUEUE_ROWS})")
    p.add_argument("--verify-key", default=None, metavar="FILE",
                   help="Ed25519 public key (PREFIX.pub of `ncguard keygen`; default $NCGUARD_VERIFY_KEY): refuse a model it did not sign, here and in every worker")


def _check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running there?)") from None


def serve_environment(args: argparse.Namespace) -> dict[str, str]:
    """The variables that carry the command's options to BentoML's worker processes."""
    workers = int(args.workers)
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    threads = getattr(args, "threads", None)
    if threads is None and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)  # one session per worker: share the cores
    env = {
        s.MODEL_ENV: str(Path(args.model).resolve()),
        s.WORKERS_ENV: str(workers),
        s.PROVIDER_ENV: getattr(args, "provider", None) or os.environ.get(s.PROVIDER_ENV, "auto"),
    }
    optional = {
        s.THREADS_ENV: threads,
        s.MAX_BATCH_INPUTS_ENV: getattr(args, "max_batch_inputs", None),
        s.MAX_BODY_BYTES_ENV: getattr(args, "max_body_bytes", None),
        s.MAX_QUEUE_ROWS_ENV: getattr(args, "max_queue_rows", None),
        API_KEYS_FILE_ENV: Path(args.api_keys).resolve() if getattr(args, "api_keys", None) else None,
    }
    env.update({name: str(value) for name, value in optional.items() if value is not None})
    s.ServeSettings.from_env({**os.environ, **env})  # ConfigError now rather than in every worker
    return env


def run_serve(args: argparse.Namespace) -> int:
    verify_key = verify_key_path(getattr(args, "verify_key", None))
    # ModelError for a missing, foreign, damaged or (with a verify key) unsigned or wrongly signed file
    loaded = load_model(args.model, verify_key=verify_key)
    env = serve_environment(args)
    if verify_key:  # each worker verifies again when it loads the model (serving.settings.VERIFY_KEY_ENV)
        env[s.VERIFY_KEY_ENV] = str(Path(verify_key).resolve())
    _check_port(args.host, args.port)
    os.environ.update(env)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage reporting: the server may have no network
    meta = loaded.metadata
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"serving {meta.name} ({len(meta.classes)} classes, score {meta.score}, threshold {meta.threshold:.6g}) "
        f"at http://{shown_host}:{args.port} with {env[s.WORKERS_ENV]} worker(s): "
        "POST /predict, POST /predict_image, GET /model, /metrics, /readyz; Ctrl+C stops",
        flush=True,
    )
    import bentoml

    # This server's own Prometheus directory (serving.exposition): BentoML's is shared by every
    # server under one $BENTOML_HOME and emptied when another one starts.
    metrics_dir = tempfile.mkdtemp(prefix=f"ncguard-metrics-{args.port}-")
    os.environ[METRICS_DIR_ENV] = metrics_dir
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that `finally` removes it
    try:
        bentoml.serve(SERVICE_IMPORT, working_dir=str(ROOT), host=args.host, port=args.port, blocking=True)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.cli ...`: the same as `ncguard serve ...`."""
    from ncguard.cli import main as ncguard_main

    return ncguard_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
