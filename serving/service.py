"""The BentoML service: one verified ncguard model behind /predict, /predict_image and /model.

Request formats. POST /predict takes either JSON, `{"inputs": [[...], ...]}`, or (faster) the
bytes of `np.save` of a [N, *input_shape] number array with `Content-Type: application/x-npy`:

    buf = io.BytesIO(); np.save(buf, x.astype(np.float32))
    curl -X POST --data-binary @x.npy -H 'Content-Type: application/x-npy' http://127.0.0.1:3000/predict

Both answer the same JSON. A .npy body is never unpickled and its header must match its size
(serving.validation); a malformed one is a 400 counted as `malformed_npy`. NcguardClient sends .npy.
POST /predict_image takes PNG/JPEG files.

Request flow. BentoML is the server (its worker processes, lifecycle, health probes, Bento
packaging); the public routes are a small Starlette app mounted in the service, so that every
refusal becomes a 4xx with `{"error": ...}` that we word and count, and so that a request does
not pay BentoML's typed API layer (about 2 ms of CPU per request, measured; see serving.api_docs
for how the routes still reach BentoML's OpenAPI document and client). Validated float32 rows go
to the worker's batching queue (serving.batcher), which merges concurrent requests into one ONNX
Runtime call in its scoring thread, with no re-encoding between validation and the session. A
full queue or a request past its latency budget is answered 503 with Retry-After.

BentoML's own request metrics and access log are switched off: the metrics labelled unknown
paths with the raw path (unbounded /metrics), and both cost every request. serving.access counts
requests by a fixed set of endpoints instead, and /metrics is served here (serving.exposition:
this server's own metrics directory, live workers' gauges only).

Every scored batch also goes to the worker's drift monitor (serving.monitor), which keeps the
Prometheus counters and drift gauges that /metrics exports; the gauges are recomputed by the
monitor's own thread, off the request path.

Options come from the environment (serving.settings), set by `ncguard serve` or by hand.
Never imports torch.
"""

from __future__ import annotations

import functools
import gc
import logging
import time

import bentoml
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ncguard.drift import score_buckets
from ncguard.runtime import Predictor, overflow_message

from .access import ApiKeys, RequestMetrics
from .api_docs import PublishedApi
from .batcher import MicroBatcher, Overloaded
from .header_timeout import install as install_header_timeout
from .exposition import exposition, metrics_directory, use_metrics_directory
from .limits import BodySizeLimit
from .metrics import count_rejection, endpoint_label, model_metrics, service_metrics, start_rejection_counts
from .model_source import resolve_model_path
from .monitor import DriftMonitor
from .settings import LARGE_BODY_BYTES, ServeSettings
from .validation import NPY_CONTENT_TYPE, Rejected, decode_images, parse_json_inputs, parse_npy_inputs

log = logging.getLogger("ncguard.serving")

settings = ServeSettings.from_env()
install_header_timeout(settings.header_timeout_s)  # uvicorn never times out a request head: serving.header_timeout

IMAGE_TYPES = ("image/png", "image/jpeg")
# Bodies this small are parsed on the event loop: a thread hop (~0.1 ms of the loop's time under
# load, profiled) costs more than reading a .npy header and viewing its bytes, or a short JSON list.
INLINE_NPY_BYTES = 1024 * 1024
INLINE_JSON_BYTES = 8 * 1024
SHED_LOG_INTERVAL_S = 10.0
GC_THRESHOLDS = (7_000, 20, 100)  # CPython's defaults are (700, 10, 10)  # at most one WARNING line about shed requests per interval


class FastJSONResponse(JSONResponse):
    """JSONResponse rendered by orjson: a 64-row answer in about a tenth of json.dumps's time."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def _current() -> "NcguardService | None":
    try:
        return bentoml.get_current_service()
    except Exception:  # no instance yet (during start-up)
        return None


def _model_label() -> str:
    service = _current()
    return service.model_name if service is not None else "unknown"


def _json_errors(route):
    """Refusals become their 4xx, overload a 503; anything else is our bug: logged, and a JSON 500 without internals."""

    @functools.wraps(route)
    async def wrapped(request: Request) -> Response:
        try:
            return await route(request)
        except Rejected as exc:
            # A refusal raised in the thread pool is carried by a future that its own traceback's
            # frames refer to: a reference cycle holding the request body until a full garbage
            # collection, which the service makes rare. Dropping the traceback breaks the cycle.
            exc.__traceback__ = None
            return _current().refuse(exc)
        except Overloaded as exc:
            exc.__traceback__ = None
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})
        except Exception:
            log.exception("unexpected error on %s", request.url.path)
            return JSONResponse({"error": "internal error in the ncguard service; see its log"}, status_code=500)

    return wrapped


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


@_json_errors
async def _predict_route(request: Request) -> Response:
    service = _current()
    body = await request.body()
    npy = _content_type(request) == NPY_CONTENT_TYPE
    parse = parse_npy_inputs if npy else parse_json_inputs
    if len(body) <= (INLINE_NPY_BYTES if npy else INLINE_JSON_BYTES):
        x = parse(body, service.predictor, settings.max_batch_inputs)
    else:  # larger bodies are parsed off the event loop, which also runs the batching queue
        x = await run_in_threadpool(parse, body, service.predictor, settings.max_batch_inputs)
    return await service.answer(x)


async def _read_image_files(request: Request) -> list[tuple[str, bytes]]:
    content_type = _content_type(request)
    if content_type in IMAGE_TYPES:
        return [("body", await request.body())]
    if content_type != "multipart/form-data":
        raise Rejected(
            "unsupported_media_type",
            f"send images as multipart/form-data (curl -F image=@photo.png) or one image as the body with "
            f"Content-Type {' or '.join(IMAGE_TYPES)}; got Content-Type {content_type or 'none'!r}",
            415,
        )
    # The body size is already capped by BodySizeLimit; these caps only keep the parser in step with it.
    try:
        form = await request.form(max_files=10_000, max_fields=10_000, max_part_size=settings.max_body_bytes)
    except (HTTPException, MultiPartException) as exc:
        raise Rejected("malformed_multipart", f"the multipart body cannot be read: {getattr(exc, 'detail', None) or exc}", 400) from None
    try:
        return [(value.filename or key, await value.read()) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    finally:
        await form.close()


@_json_errors
async def _predict_image_route(request: Request) -> Response:
    service = _current()
    files = await _read_image_files(request)
    x = await run_in_threadpool(
        functools.partial(
            decode_images,
            files,
            service.predictor,
            max_inputs=settings.max_batch_inputs,
            max_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_pixels,
        )
    )
    return await service.answer(x)


@_json_errors
async def _model_route(request: Request) -> Response:
    return JSONResponse(_current().model_description())


async def _metrics_route(request: Request) -> Response:
    text, content_type = await run_in_threadpool(exposition, _current().metrics_dir)
    return Response(text, media_type=content_type)


routes = Starlette(
    routes=[
        Route("/predict", _predict_route, methods=["POST"]),
        Route("/predict_image", _predict_image_route, methods=["POST"]),
        Route("/model", _model_route, methods=["GET"]),
        Route("/metrics", _metrics_route, methods=["GET"]),
    ]
)


@bentoml.service(
    name="ncguard",
    workers=settings.workers,
    traffic={"timeout": 60},
    metrics={"enabled": False, "namespace": "bentoml_service"},
    logging={"access": {"enabled": settings.access_log}},
    # BentoML always wraps requests in OpenTelemetry's ASGI middleware; with no tracing exporter
    # configured its spans go nowhere but still cost about a quarter of a small request's CPU
    # (profiled under 32 clients). NCGUARD_TRACING=1 keeps them for a deployment that exports traces.
    tracing={} if settings.tracing else {"excluded_urls": [".*"]},
)
@bentoml.asgi_app(routes, path="/")
class NcguardService:
    """Loads the model once per worker; every public route ends in `answer`."""

    def __init__(self) -> None:
        self.metrics_dir = metrics_directory()
        use_metrics_directory(self.metrics_dir)  # before any metric of this process is created
        path = resolve_model_path(settings)
        self.predictor = Predictor(path, provider=settings.provider, threads=settings.threads, verify_key=settings.verify_key)
        self.metadata = self.predictor.metadata
        self.model_name = self.metadata.name
        reference = self.metadata.drift_reference
        metrics = model_metrics(score_buckets(reference.score_quantiles, self.metadata.threshold))
        self.monitor = DriftMonitor(self.metadata, metrics, window=settings.drift_window, min_samples=settings.drift_min_samples, background=True).start()
        start_rejection_counts(self.model_name)
        self.component_names = self.predictor.component_names
        self._ood_by_component = [metrics.ood_by_component.labels(model=self.model_name, component=name) for name in self.component_names]
        counters = service_metrics()
        self._shed_counter = counters.shed.labels(model=self.model_name)
        self._batch_rows = counters.batch_rows.labels(model=self.model_name)
        self._shed_since_log = 0
        self._shed_logged_at = float("-inf")
        self.batcher = MicroBatcher(
            self.score,
            max_batch_rows=settings.batch_size,
            max_queue_rows=settings.max_queue_rows,
            latency_budget_s=settings.batch_latency_ms / 1000,
            on_batch=self._batch_rows.observe,
            on_shed=self._count_shed,
        )
        # Everything loaded so far (BentoML, ONNX, NumPy, the model) lives as long as the worker. Left
        # to the collector, every full collection walked all of it while holding the GIL, which under
        # load stalled every connection at once about once a second (32 clients of 1-row requests:
        # p99 ~15x p50). Frozen, collections walk only newer objects; the request path makes almost
        # no reference cycles (see serving.validation's header cache), so collections can be rarer.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        log.info("serving %s (%s, score %s, threshold %.6g) from %s", self.model_name, self.metadata.version, self.metadata.score, self.metadata.threshold, path)

    def score(self, inputs: np.ndarray) -> np.ndarray:
        """float32 rows -> float64 [N, 6]: class index, confidence, OOD score, is-OOD, finite, and the
        index of the part of the score that drove it (into `component_names`).

        Runs in the batcher's scoring thread; every scored row also goes to the monitor.
        """
        # not strict: rows merged from other requests must not fail with one overflowing row
        result = self.predictor.predict(inputs, batch_size=max(len(inputs), 1), strict=False)
        ok = result.finite
        try:
            if ok.all():
                self.monitor.observe(result.class_index, result.ood_score, result.is_ood, result.features)
            else:
                self.monitor.observe(result.class_index[ok], result.ood_score[ok], result.is_ood[ok], result.features[ok])
            flagged = result.is_ood & ok
            if flagged.any():
                for index, count in enumerate(np.bincount(result.driver[flagged], minlength=len(self._ood_by_component))):
                    if count:
                        self._ood_by_component[index].inc(int(count))
        except Exception:  # monitoring must never cost a client its prediction
            log.exception("the drift monitor failed on a batch of %d; the predictions are still returned", len(inputs))
        rows = np.stack([result.class_index, result.confidence, result.ood_score, result.is_ood, ok, result.driver], axis=1).astype(np.float64)
        rows[~ok, :4] = 0.0  # JSON has no NaN or infinity; `_respond` refuses these rows
        return rows

    def _count_shed(self, count: int) -> None:
        """Count shed requests; log them as one WARNING line per interval at most, never one per request."""
        self._shed_counter.inc(count)
        self._shed_since_log += count
        now = time.monotonic()
        if now - self._shed_logged_at >= SHED_LOG_INTERVAL_S:
            log.warning(
                "overloaded: shed %d request(s) with 503 in the last %.0f s (queue limit %d rows, latency budget %d ms)",
                self._shed_since_log, min(now - self._shed_logged_at, 1e9), settings.max_queue_rows, settings.batch_latency_ms,
            )
            self._shed_since_log = 0
            self._shed_logged_at = now

    async def answer(self, x: np.ndarray) -> Response:
        """Score validated rows through the batching queue and build the JSON answer (or a refusal)."""
        return self._respond(await self.batcher.submit(x))

    def _respond(self, table: np.ndarray) -> Response:
        """The [N, 6] table of `score` -> the JSON answer, or a refusal naming the rows that overflowed."""
        overflowed = np.flatnonzero(table[:, 4] == 0)
        if len(overflowed):
            return self.refuse(Rejected("overflow", overflow_message(overflowed)))
        classes, parts = self.metadata.classes, self.component_names
        indices = table[:, 0].astype(np.int64).tolist()  # whole columns to Python at once: no per-cell NumPy scalars
        drivers = table[:, 5].astype(np.int64).tolist()
        rows = [
            {"label": classes[index], "class_index": index, "confidence": confidence, "ood_score": score, "is_ood": flag, "ood_driver": parts[driver] if flag else None}
            for index, confidence, score, flag, driver in zip(indices, table[:, 1].tolist(), table[:, 2].tolist(), (table[:, 3] != 0).tolist(), drivers)
        ]
        return FastJSONResponse({"predictions": rows, "model": self.model_name, "threshold": self.metadata.threshold})

    def refuse(self, exc: Rejected) -> JSONResponse:
        count_rejection(self.model_name, exc.reason)
        log.debug("rejected (%s): %s", exc.reason, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def model_description(self) -> dict:
        meta = self.metadata
        return {
            "name": meta.name,
            "version": meta.version,
            "classes": list(meta.classes),
            "input_shape": list(meta.input_shape),
            "score": meta.score,
            "threshold": meta.threshold,
        }

    @bentoml.on_shutdown
    def _stop_batcher(self) -> None:
        self.batcher.close()


# Middlewares, outermost first: every answer is counted (401s and 413s too), then the key is
# checked, then the body is capped, then BentoML's documents get the public API added.
NcguardService.add_asgi_middleware(RequestMetrics, metrics=service_metrics, model=_model_label, endpoint=endpoint_label)
NcguardService.add_asgi_middleware(ApiKeys, keys=settings.api_keys)
NcguardService.add_asgi_middleware(
    BodySizeLimit,
    limit_for_path=lambda path: settings.max_body_bytes,
    on_reject=lambda: count_rejection(_model_label(), "body_too_large"),
    large_body_bytes=LARGE_BODY_BYTES,
    large_body_slots=settings.large_body_slots,
)
NcguardService.add_asgi_middleware(PublishedApi)
