"""The public API's schemas, published in BentoML's own documents (/docs.json and /schema.json).

The public routes are a Starlette app mounted in the service (serving.routes), not `@bentoml.api`
methods: BentoML's typed API layer costs about 2 ms of CPU per request before any work, several
times what ONNX Runtime needs for one input. BentoML documents only its api methods (and mounted
FastAPI apps), so its OpenAPI document listed the health routes and nothing a client could call,
and its own client (`bentoml.SyncHTTPClient`, which reads /schema.json) found no `predict`.

So the schemas are declared here once, as pydantic models (the library BentoML itself builds its
schemas with), and `PublishedApi`, an ASGI middleware, adds them to the two documents BentoML
serves: the routes with their request bodies (JSON, .npy, multipart, bare PNG/JPEG) and every
answer they give (200, the 4xx refusals, 401 without a key, 503 with Retry-After when overloaded)
to the OpenAPI document, and `predict` / `predict_image` to /schema.json in the form BentoML's
client reads, so `client.predict(inputs=[...])` posts `{"inputs": [...]}` to /predict.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pydantic

from .limits import Receive, Scope, Send

OPENAPI_PATH = "/docs.json"
SCHEMA_PATH = "/schema.json"
REF = "#/components/schemas/{model}"


class PredictRequest(pydantic.BaseModel):
    """A batch of inputs, each an array of the model's input shape (GET /model says which)."""

    inputs: list[Any] = pydantic.Field(description="a batch: a list of arrays of the model's input shape, numbers only")


class Prediction(pydantic.BaseModel):
    label: str = pydantic.Field(description="the predicted class's name")
    class_index: int = pydantic.Field(description="the predicted class's index in the model's class list")
    confidence: float = pydantic.Field(description="the predicted class's probability")
    ood_score: float = pydantic.Field(description="out-of-distribution score; higher is more unusual")
    is_ood: bool = pydantic.Field(description="whether the score is above the model's threshold")
    ood_driver: Optional[str] = pydantic.Field(
        description="for an OOD decision, the part of the score that drove it, as layer:score (for the default model, "
        "a conv block (block3) = the input looks different at the pixel or shape level, detection = it looks like no known class); null otherwise"
    )


class PredictResponse(pydantic.BaseModel):
    predictions: list[Prediction] = pydantic.Field(description="one per input, in order")
    model: str = pydantic.Field(description="the served model's name")
    threshold: float = pydantic.Field(description="the OOD score above which an input is flagged")


class ModelInfo(pydantic.BaseModel):
    name: str
    version: str
    classes: list[str]
    input_shape: list[int] = pydantic.Field(description="one input's shape, without the batch axis")
    score: str = pydantic.Field(description="the OOD score the model computes")
    threshold: float


class ErrorResponse(pydantic.BaseModel):
    error: str = pydantic.Field(description="what is wrong, in words")


MODELS = (PredictRequest, Prediction, PredictResponse, ModelInfo, ErrorResponse)
BINARY = {"type": "string", "format": "binary"}


def _ref(model: type[pydantic.BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _error(description: str, headers: dict | None = None) -> dict:
    answer = {"description": description, "content": _json(_ref(ErrorResponse))}
    if headers:
        answer["headers"] = headers
    return answer


UNAUTHORIZED = _error("an API key is required and was missing or wrong (only when the server was started with API keys)")
OVERLOADED = _error(
    "the server is overloaded: its queue is full or the request waited past its latency budget; retry after Retry-After seconds",
    {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}},
)
REFUSALS = {
    "400": _error("the body cannot be read: malformed JSON, .npy or multipart, or a missing field"),
    "401": UNAUTHORIZED,
    "413": _error("too large: the body, the number of inputs, or an image's or the request's pixels"),
    "415": _error("a Content-Type this route does not take"),
    "422": _error("readable but not valid inputs: wrong shape or dtype, NaN or infinity, an empty batch, an undecodable image"),
    "503": OVERLOADED,
}


def _scored(description: str) -> dict:
    return {"200": {"description": description, "content": _json(_ref(PredictResponse))}, **REFUSALS}


def openapi_paths() -> dict:
    """OpenAPI path items of the public routes."""
    npy = {"schema": BINARY}
    return {
        "/predict": {
            "post": {
                "tags": ["Service APIs"],
                "operationId": "predict",
                "summary": "Label and OOD score for a batch of inputs",
                "description": (
                    "Send JSON `{\"inputs\": [...]}` or, faster, the bytes of `np.save(batch)` (float32 "
                    "[N, *input_shape]) with Content-Type application/x-npy. Both answer the same JSON."
                ),
                "requestBody": {
                    "required": True,
                    "content": {**_json(_ref(PredictRequest)), "application/x-npy": npy},
                },
                "responses": _scored("one prediction per input"),
            }
        },
        "/predict_image": {
            "post": {
                "tags": ["Service APIs"],
                "operationId": "predict_image",
                "summary": "Label and OOD score for PNG/JPEG images",
                "description": "Images as multipart/form-data (any field names), or one image as the body; converted to the model's channels and size.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {"type": "object", "properties": {"image": {"type": "array", "items": BINARY}}}
                        },
                        "image/png": {"schema": BINARY},
                        "image/jpeg": {"schema": BINARY},
                    },
                },
                "responses": _scored("one prediction per image"),
            }
        },
        "/model": {
            "get": {
                "tags": ["Service APIs"],
                "operationId": "model",
                "summary": "The served model: classes, input shape, OOD score and threshold",
                "responses": {"200": {"description": "the model", "content": _json(_ref(ModelInfo))}, "401": UNAUTHORIZED},
            }
        },
    }


def openapi_components() -> dict:
    schemas: dict = {}
    for model in MODELS:
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {"schemas": schemas}


def client_routes() -> list[dict]:
    """/schema.json entries in the form BentoML's HTTP client reads (see _bentoml_impl/client/http.py)."""
    prediction_output = {"type": "object", "media_type": "application/json"}
    return [
        {
            "name": "predict",
            "route": "/predict",
            "description": "Label and OOD score for a batch of inputs",
            "batchable": False,
            "input": {"type": "object", "properties": {"inputs": {"type": "array", "items": {}}}, "required": ["inputs"]},
            "output": prediction_output,
        },
        {
            "name": "predict_image",
            "route": "/predict_image",
            "description": "Label and OOD score for PNG/JPEG images",
            "batchable": False,
            "input": {"type": "object", "properties": {"images": {"type": "array", "items": {"type": "file", "format": "image"}}}, "required": ["images"]},
            "output": prediction_output,
        },
    ]


def publish(document: dict, path: str) -> dict:
    """BentoML's /docs.json or /schema.json with the public API added."""
    if path == OPENAPI_PATH:
        document.setdefault("paths", {}).update(openapi_paths())
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(openapi_components()["schemas"])
    else:
        document["routes"] = [*document.get("routes", []), *client_routes()]
    return document


class PublishedApi:
    """ASGI middleware: rewrites the answers of GET /docs.json and /schema.json (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path not in (OPENAPI_PATH, SCHEMA_PATH) or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(publish(json.loads(body), path)).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 500), "headers": headers})
        await send({"type": "http.response.body", "body": body})
