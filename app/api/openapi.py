"""OpenAPI for routes that read their body themselves (JSON or multipart on one path)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from app.schemas import ErrorBody

_BODY_MODELS: dict[str, type[BaseModel]] = {}

ERROR_DESCRIPTIONS = {
    400: "malformed request (bad_multipart)",
    401: "missing token (missing_token), with WWW-Authenticate: Bearer",
    403: "invalid token (invalid_token)",
    404: "unknown model, version or job",
    405: "method not allowed",
    409: "conflict: job_finished, corrupt_version",
    413: "too_many_inputs, too_much_work, body_too_large, image_too_large",
    415: "unsupported_media_type",
    422: "bad input or a body that does not match the schema, with a reason",
    503: "model_unavailable, queue_unavailable, corrupt_active, starting",
}


def error_responses(*codes: int, body: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for the error statuses a route really answers, each with the one error body."""
    return {code: {"model": body, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def body_schema(model: type[BaseModel]) -> dict[str, str]:
    """A reference to ``model``'s JSON schema, which :func:`install_openapi` adds to the components
    (for a route that reads its body itself)."""
    _BODY_MODELS[model.__name__] = model
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def request_body(model: type[BaseModel], multipart_fields: dict[str, str]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body of ``model`` or a multipart upload of image files."""
    properties: dict[str, Any] = {
        "model": {"type": "string"},
        "images": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
        **{name: {"type": kind} for name, kind in multipart_fields.items()},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body_schema(model)},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["model", "images"],
                        "properties": properties,
                        "additionalProperties": False,  # other fields are a 422 unknown_field
                    }
                },
            },
        }
    }


def install_openapi(app: FastAPI) -> None:
    """Add the JSON body schemas referenced by :func:`request_body` to the generated components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _BODY_MODELS.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, definition in body.pop("$defs", {}).items():
                components.setdefault(def_name, definition)
            components[name] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
