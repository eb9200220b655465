"""The BentoML service: one verified ncguard model behind /predict, /predict_image and /model.

Request formats. POST /predict takes either JSON, `{"inputs": [[...], ...]}`, or (faster) the
bytes of `np.save` of a [N, *input_shape] number array with `Content-Type: application/x-npy`:

    buf = io.BytesIO(); np.save(buf, x.astype(np.float32))
    curl -X POST --data-binary @x.npy -H 'Content-Type: application/x-npy' http://127.0.0.1:3000/predict

Both answer the same JSON. A .npy body is never unpickled and its header must match its size
(serving.validation); a malformed one is a 400 counted as `malformed_npy`. NcguardClient sends .npy.
POST /predict_image takes PNG/JPEG files.

Request flow. The public routes are a small Starlette app mounted into the service, so that every
refusal (malformed JSON, a missing field, an oversized body, a broken image) becomes a 4xx with
`{"error": ...}` that we word and count; BentoML's own request parsing answers some of these with
its generic validation text or a 500. Validated arrays then go through the service's batchable
method `infer_batch` via the service's self-proxy (`self.to_async.infer_batch`), which is how
BentoML 1.4 lets one endpoint reach a batchable one in the same process: the call enters BentoML's
adaptive-batching dispatcher, which merges rows from concurrent requests into one ONNX Runtime call.
(`bentoml.depends` on a second service would batch too, but costs a process hop and pickles.)
The hop costs: the proxy re-encodes the rows as JSON, BentoML parses and validates them again, and
the answer makes the same trip back (measured on 2 shared cores: about 5 ms of a 1-row request and
14 ms of a 16-row one, several times ONNX Runtime's own time). So a request skips it, and is scored
directly in a worker thread (`score`, the same code `infer_batch` runs), when there is nothing to
merge it with: when it is already a full batch (at least max_batch_size rows), or when no other
request is being scored or queued in this worker (a lone caller; the batching queue would run it
alone anyway). Concurrent requests still meet in the queue and are merged.

`infer_batch` is also reachable at POST /infer_batch (BentoML exposes every api); it re-checks its
input with the same `Predictor.check_input`, so direct callers get a 400, never a 5xx.

Every scored batch also goes to the worker's drift monitor (serving.monitor), which keeps the
Prometheus counters and drift gauges that /metrics exports; the gauges are recomputed by the
monitor's own thread, off the request path.

Options come from the environment (serving.settings), set by `ncguard serve` or by hand.
Never imports torch.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Annotated, Awaitable, Callable

import bentoml
from bentoml.validators import ContentType
import numpy as np
import pydantic
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ncguard.runtime import Predictor, overflow_message

from .limits import BodySizeLimit
from .metrics import count_rejection, model_metrics, start_rejection_counts
from .model_source import resolve_model_path
from .monitor import DriftMonitor, score_buckets
from .settings import ServeSettings
from .validation import NPY_CONTENT_TYPE, Rejected, decode_images, parse_json_inputs, parse_npy_inputs

log = logging.getLogger("ncguard.serving")

settings = ServeSettings.from_env()

INFER_ROUTE = "/infer_batch"
IMAGE_TYPES = ("image/png", "image/jpeg")
# The self-proxy re-encodes validated float32 rows as JSON, which can take several times the bytes
# of the client's own JSON ("0.1" comes back as 0.10000000149011612), so the internal route gets room.
INFER_BODY_FACTOR = 8


# Declaring the media type spares BentoML from deriving it from the output's JSON schema on every
# response (measured: about half of /infer_batch's time for a one-row request).
JSON_OUTPUT = ContentType("application/json")


def _current() -> "NcguardService | None":
    try:
        return bentoml.get_current_service()
    except Exception:  # no instance yet (during start-up)
        return None


def _model_label() -> str:
    service = _current()
    return service.model_name if service is not None else "unknown"


def _check_infer_rows(x: np.ndarray) -> np.ndarray:
    """Validation of /infer_batch input: the same check as /predict, so direct callers get a 400."""
    service = _current()
    if service is None:
        return x
    if x.ndim >= 1 and len(x) > settings.max_batch_inputs:
        raise ValueError(f"the batch has {len(x)} inputs, more than the {settings.max_batch_inputs} allowed per request")
    return service.predictor.check_input(x)


def _json_errors(route: Callable[[Request], Awaitable[JSONResponse]]) -> Callable[[Request], Awaitable[JSONResponse]]:
    """Refusals become their 4xx; anything else is our bug: logged, and a JSON 500 without internals."""

    @functools.wraps(route)
    async def wrapped(request: Request) -> JSONResponse:
        try:
            return await route(request)
        except Rejected as exc:
            return _current().refuse(exc)
        except Exception:
            log.exception("unexpected error on %s", request.url.path)
            return JSONResponse({"error": "internal error in the ncguard service; see its log"}, status_code=500)

    return wrapped


@_json_errors
async def _predict_route(request: Request) -> JSONResponse:
    service = _current()
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    parse = parse_npy_inputs if content_type == NPY_CONTENT_TYPE else parse_json_inputs
    # parsing and checking run off the event loop, which also runs BentoML's batching dispatcher
    x = await run_in_threadpool(parse, body, service.predictor, settings.max_batch_inputs)
    return await service.answer(x)


async def _read_image_files(request: Request) -> list[tuple[str, bytes]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in IMAGE_TYPES:
        return [("body", await request.body())]
    if content_type != "multipart/form-data":
        raise Rejected(
            "missing_field",
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
async def _predict_image_route(request: Request) -> JSONResponse:
    service = _current()
    files = await _read_image_files(request)
    x = await run_in_threadpool(
        functools.partial(decode_images, files, service.predictor, max_inputs=settings.max_batch_inputs, max_pixels=settings.max_image_pixels)
    )
    return await service.answer(x)


@_json_errors
async def _model_route(request: Request) -> JSONResponse:
    return JSONResponse(_current().model_description())


routes = Starlette(
    routes=[
        Route("/predict", _predict_route, methods=["POST"]),
        Route("/predict_image", _predict_image_route, methods=["POST"]),
        Route("/model", _model_route, methods=["GET"]),
    ]
)


@bentoml.service(name="ncguard", workers=settings.workers, traffic={"timeout": 60})
@bentoml.asgi_app(routes, path="/")
class NcguardService:
    """Loads the model once per worker; every public route ends in `answer`."""

    def __init__(self) -> None:
        path = resolve_model_path(settings)
        self.predictor = Predictor(path, provider=settings.provider, threads=settings.threads)
        self.metadata = self.predictor.metadata
        self.model_name = self.metadata.name
        reference = self.metadata.drift_reference
        metrics = model_metrics(score_buckets(reference.score_quantiles, self.metadata.threshold))
        self.monitor = DriftMonitor(self.metadata, metrics, window=settings.drift_window, min_samples=settings.drift_min_samples, background=True).start()
        start_rejection_counts(self.model_name)
        self._in_flight = 0  # requests in `answer` now; changed on the event loop only, so no lock
        log.info("serving %s (%s, score %s, threshold %.6g) from %s", self.model_name, self.metadata.version, self.metadata.score, self.metadata.threshold, path)

    @bentoml.api(
        route=INFER_ROUTE,
        batchable=True,
        batch_dim=(0, 0),
        max_batch_size=settings.batch_size,
        max_latency_ms=settings.batch_latency_ms,
    )
    def infer_batch(self, inputs: Annotated[np.ndarray, pydantic.AfterValidator(_check_infer_rows)]) -> Annotated[np.ndarray, JSON_OUTPUT]:
        """Score float32 rows [N, *input_shape] -> float64 [N, 5]: class index, confidence, OOD score, is-OOD, finite.

        Internal: /predict and /predict_image call this. A plain array (not a list of models) because
        BentoML rebuilds the output's JSON schema on every call, which costs milliseconds for nested models.
        """
        return self.score(inputs)

    def score(self, inputs: np.ndarray) -> np.ndarray:
        """float32 rows -> the [N, 5] table of `infer_batch`; every scored row also goes to the monitor."""
        # not strict: rows merged from other requests must not fail with one overflowing row
        result = self.predictor.predict(inputs, batch_size=max(len(inputs), 1), strict=False)
        ok = result.finite
        try:
            if ok.all():
                self.monitor.observe(result.class_index, result.ood_score, result.is_ood, result.features)
            else:
                self.monitor.observe(result.class_index[ok], result.ood_score[ok], result.is_ood[ok], result.features[ok])
        except Exception:  # monitoring must never cost a client its prediction
            log.exception("the drift monitor failed on a batch of %d; the predictions are still returned", len(inputs))
        rows = np.stack([result.class_index, result.confidence, result.ood_score, result.is_ood, ok], axis=1).astype(np.float64)
        rows[~ok, :4] = 0.0  # JSON has no NaN or infinity; `answer` refuses these rows
        return rows

    def _self_client(self):
        """The service's own async client (BentoML's self-proxy), with session recycling turned off.

        BentoML 1.4.30+ recycles the proxy's aiohttp session every 100 requests or 5 minutes and
        closes the old one with requests still in flight, which fails them under concurrent load
        ("Server disconnected"; bentoml/BentoML#5544, #5698). The self-proxy talks to this process
        in memory, so there is nothing to gain from recycling: keep one session for the worker's life.
        """
        client = self.to_async
        manager = getattr(client, "_session_manager", None)
        if manager is not None and getattr(manager, "max_requests", None) != sys.maxsize:
            manager.max_requests = sys.maxsize
            manager.max_age = float("inf")
        return client

    async def answer(self, x: np.ndarray) -> JSONResponse:
        """Score validated rows and build the JSON answer (or a refusal)."""
        alone = self._in_flight == 0
        self._in_flight += 1
        try:
            if alone or len(x) >= settings.batch_size:  # nothing to merge with: no hop
                return self._respond(await run_in_threadpool(self.score, x))
            return await self._answer_batched(x)
        finally:
            self._in_flight -= 1

    async def _answer_batched(self, x: np.ndarray) -> JSONResponse:
        """Score `x` through BentoML's batching queue (the self-proxy), merged with concurrent requests."""
        import aiohttp
        from bentoml.exceptions import BentoMLException

        for attempt in (1, 2):
            try:
                predictions = await self._self_client().infer_batch(inputs=x)
                break
            except BentoMLException as exc:  # e.g. 503 when the batching queue is over its latency budget
                status = int(exc.error_code)
                log.warning("inference failed with HTTP %d: %s", status, exc)
                return JSONResponse({"error": f"the model could not answer: {exc}"}, status_code=status)
            except aiohttp.ClientConnectionError:  # the in-memory hop dropped; scoring is pure, so retry once
                if attempt == 2:
                    log.exception("inference failed twice on the in-process connection")
                    return JSONResponse({"error": "the model could not answer (internal connection failed); retry"}, status_code=503)
        return self._respond(predictions)

    def _respond(self, predictions) -> JSONResponse:
        """The [N, 5] table -> the JSON answer, or a refusal naming the rows that overflowed."""
        table = np.asarray(predictions, dtype=np.float64).reshape(-1, 5)
        overflowed = np.flatnonzero(table[:, 4] == 0)
        if len(overflowed):
            return self.refuse(Rejected("overflow", overflow_message(overflowed)))
        classes = self.metadata.classes
        indices = table[:, 0].astype(np.int64).tolist()  # whole columns to Python at once: no per-cell NumPy scalars
        rows = [
            {"label": classes[index], "class_index": index, "confidence": confidence, "ood_score": score, "is_ood": flag}
            for index, confidence, score, flag in zip(indices, table[:, 1].tolist(), table[:, 2].tolist(), (table[:, 3] != 0).tolist())
        ]
        return JSONResponse({"predictions": rows, "model": self.model_name, "threshold": self.metadata.threshold})

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


def _body_limit(path: str) -> int:
    factor = INFER_BODY_FACTOR if path.rstrip("/") == INFER_ROUTE else 1
    return settings.max_body_bytes * factor


NcguardService.add_asgi_middleware(
    BodySizeLimit,
    limit_for_path=_body_limit,
    on_reject=lambda: count_rejection(_model_label(), "body_too_large"),
)
