"""The OpenAPI schema at /openapi.json: truthful enough for schema-driven clients and fuzzers.

The POST handlers parse their JSON themselves (to answer 400 in OpenAI's
error shape, not FastAPI's 422), so FastAPI cannot see their request bodies.
The routes declare them as `$ref`s (`request_body`), and `openapi_schema`
adds the request models' JSON schemas to the components, narrows `model` to
the one name served, and marks the routes that need the bearer key.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from kvos.entrypoints.openai_protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
)

_REF_TEMPLATE = "#/components/schemas/{model}"

_ERRORS = {
    400: "Invalid request: a field's type or value, or the context length",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "Request body too large",
    429: "Too many requests waiting; see Retry-After",
    503: "Shutting down, or the engine failed",
}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads `model` from its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses` declaring OpenAI's error body for each status."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


def streamed_or_whole(description: str, chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or Server-Sent Events when the request says `"stream": true`.

    As OpenAPI 3.1 describes event streams, the schema is one event's: its
    `data` is `chunk` as JSON, an error (a failure mid-stream), or `[DONE]`.
    """
    payload = {"anyOf": [_ref(chunk), _ref(ErrorResponse)]}
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]
    }
    event = {"type": "object", "properties": {"data": data}, "required": ["data"]}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF_TEMPLATE.format(model=model.__name__)}


def openapi_schema(app: FastAPI, model_name: str, secured_paths: Collection[str]) -> dict[str, Any]:
    """The schema FastAPI derives from the routes, completed with what it cannot see."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    # The request bodies, and the chat stream's chunk (completions chunks are CompletionResponses).
    _, extra = models_json_schema(
        [
            (CompletionRequest, "validation"),
            (ChatCompletionRequest, "validation"),
            (ChatCompletionChunk, "serialization"),
        ],
        ref_template=_REF_TEMPLATE,
    )
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(extra["$defs"])
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        components["schemas"][name]["properties"]["model"] = {
            "type": "string",
            "enum": [model_name],
            "description": "The served model's id (any other: 404)",
        }
    if secured_paths:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in secured_paths:
            for operation in schema["paths"][path].values():
                operation["security"] = [{"bearer": []}]
    return schema
