"""The OpenAPI 3.1 document, generated from the route table and the models' JSON schemas.

Nothing here describes a field: schemas come from pydantic (3.1 uses JSON Schema 2020-12, which
is what pydantic emits), and which model goes where comes from `routes.ROUTES`.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bridge.api.routes import Route
from bridge.api.schemas import ErrorResponse

_REF = "#/components/schemas/{model}"
_JSON_TYPES = {
    "POST": ("application/json",),
    "PATCH": ("application/json", "application/merge-patch+json"),
}


def build_openapi(
    routes: list[Route], *, title: str = "callbridge", version: str
) -> dict[str, Any]:
    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorResponse, "serialization")
    ]
    for route in routes:
        if route.request is not None:
            pairs.append((route.request, "validation"))
        if route.query is not None:
            pairs.append((route.query, "validation"))
        if route.response is not None:
            pairs.append((route.response, "serialization"))
    refs, top = models_json_schema(list(dict.fromkeys(pairs)), ref_template=_REF)
    schemas: dict[str, Any] = top.get("$defs", {})

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]  # type: ignore[index]

    error = {"application/json": {"schema": ref(ErrorResponse, "serialization")}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": [route.tag],
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        if route.query is not None:
            query_schema = _resolve(ref(route.query, "validation"), schemas)
            for name, schema in query_schema.get("properties", {}).items():
                params.append(
                    {
                        "name": name,
                        "in": "query",
                        "required": name in query_schema.get("required", []),
                        "schema": schema,
                    }
                )
        if params:
            op["parameters"] = params
        if route.request is not None:
            body = {"schema": ref(route.request, "validation")}
            op["requestBody"] = {
                "required": True,
                "content": {
                    ct: body for ct in _JSON_TYPES.get(route.method, ("application/json",))
                },
            }
        op["responses"] = _responses(route, ref, error)
        if route.public:
            op["security"] = []
        paths.setdefault(route.full_path, {})[route.method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Local control API of callbridge: assistants, SIP trunks, numbers and"
            " call control, mirroring the hosted product's /api/v1.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `callbridge api-key create`.",
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    target = schema.get("$ref")
    return schemas[target.rsplit("/", 1)[1]] if target else schema


def _responses(route: Route, ref: Any, error: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    ok = HTTPStatus(route.status).phrase
    if route.status == 204:
        responses["204"] = {"description": ok}
    else:
        schema: dict[str, Any] = (
            ref(route.response, "serialization") if route.response else {"type": "object"}
        )
        if route.many:
            schema = {
                "type": "object",
                "properties": {"data": {"type": "array", "items": schema}},
                "required": ["data"],
            }
        responses[str(route.status)] = {
            "description": ok,
            "content": {"application/json": {"schema": schema}},
        }
    statuses = set(route.errors)
    if not route.public:
        statuses.add(401)
    if route.request is not None:
        statuses |= {400, 413, 415, 422}
    if route.query is not None:
        statuses.add(422)
    if "{" in route.path:
        statuses.add(404)
    for status in sorted(statuses):
        responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": error}
    if 401 in statuses:
        responses["401"]["headers"] = {
            "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
        }
    responses["default"] = {"description": "Unexpected error", "content": error}
    return responses
