"""The OpenAPI document served at ``/api/v1/openapi.json``, built from the body specs."""

from __future__ import annotations

from typing import Any

from .. import __version__
from .schema import RUN_STATES
from .validation import (
    CREATE_RUN,
    FINISH,
    HEARTBEAT,
    INSTANCE_PREEMPTING,
    LOG,
    PREEMPTING,
    Spec,
    spec_schema,
)

_TIME = {"type": ["string", "null"], "format": "date-time"}
_NULLABLE_STR = {"type": ["string", "null"]}

RUN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "maxLength": 64},
        "project": {"type": "string"},
        "state": {"type": "string", "enum": list(RUN_STATES)},
        "preempting": {"type": "boolean"},
        "resumed": {"type": "boolean"},
        "step": {"type": "integer", "description": "last step logged; -1 when none"},
        "incarnation": {"type": "integer"},
        "config": {"type": "object"},
        "meta": {"type": "object"},
        "notice": {"type": ["object", "null"]},
        "instance_id": _NULLABLE_STR,
        "host": _NULLABLE_STR,
        "sweep_id": _NULLABLE_STR,
        "exit_code": {"type": ["integer", "null"]},
        "requeues": {"type": "integer"},
        "created_at": _TIME,
        "updated_at": _TIME,
        "heartbeat_at": _TIME,
        "ended_at": _TIME,
        "heartbeat_timeout": {"type": "number"},
    },
}
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "string",
            "enum": [
                "bad_request",
                "unauthorized",
                "not_found",
                "conflict",
                "stale_incarnation",
                "too_large",
            ],
        },
        "message": {"type": "string"},
        "field": {"type": "string"},
    },
    "required": ["error", "message"],
}

_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_RUN_REF = {"$ref": "#/components/schemas/Run"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body: Spec | None = None,
    params: list[dict[str, Any]] | None = None,
    status: str = "200",
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {status: ok}
    for code, text in {
        "400": "bad input",
        "401": "missing or wrong API key",
        **(extra or {}),
    }.items():
        responses[code] = _json({"$ref": "#/components/schemas/Error"}, text)
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": spec_schema(body)}},
        }
    return op


def build_openapi() -> dict[str, Any]:
    """The whole document."""
    stale = {"404": "unknown run", "409": "stale incarnation or ended run"}
    query = [
        {"name": n, "in": "query", "required": False, "schema": {"type": t}}
        for n, t in (
            ("state", "string"),
            ("sweep_id", "string"),
            ("instance_id", "string"),
            ("limit", "integer"),
        )
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "preemptwatch run server", "version": __version__},
        "components": {
            "schemas": {"Run": RUN_SCHEMA, "Error": ERROR_SCHEMA},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/api/v1/runs": {
                "post": _op(
                    "create or resume a run (201 created, 200 resumed)",
                    _json(_RUN_REF),
                    body=CREATE_RUN,
                    status="201",
                    extra={
                        "404": "resume=must and no such run",
                        "409": "resume=never and the run exists, or it is still running",
                    },
                ),
                "get": _op(
                    "list runs, newest first",
                    _json(
                        {
                            "type": "object",
                            "properties": {"runs": {"type": "array", "items": _RUN_REF}},
                        }
                    ),
                    params=query,
                ),
            },
            "/api/v1/runs/{run_id}": {
                "get": _op("one run", _json(_RUN_REF), params=[_RUN_ID], extra={"404": "unknown"})
            },
            "/api/v1/runs/{run_id}/heartbeat": {
                "post": _op(
                    "heartbeat",
                    _json(
                        {
                            "type": "object",
                            "properties": {
                                "state": {"type": "string"},
                                "preempting": {"type": "boolean"},
                            },
                        }
                    ),
                    body=HEARTBEAT,
                    params=[_RUN_ID],
                    extra=stale,
                )
            },
            "/api/v1/runs/{run_id}/log": {
                "post": _op(
                    "log a step (without step: last + 1; the same step merges)",
                    _json({"type": "object", "properties": {"step": {"type": "integer"}}}),
                    body=LOG,
                    params=[_RUN_ID],
                    extra={**stale, "409": "stale incarnation, ended run or step backwards"},
                )
            },
            "/api/v1/runs/{run_id}/history": {
                "get": _op(
                    "logged steps in order",
                    _json({"type": "object", "properties": {"history": {"type": "array"}}}),
                    params=[_RUN_ID],
                    extra={"404": "unknown run"},
                )
            },
            "/api/v1/runs/{run_id}/preempting": {
                "post": _op(
                    "mark the run preempting",
                    _json(_RUN_REF),
                    body=PREEMPTING,
                    params=[_RUN_ID],
                    extra=stale,
                )
            },
            "/api/v1/runs/{run_id}/finish": {
                "post": _op(
                    "end the run with its exit code",
                    _json(_RUN_REF),
                    body=FINISH,
                    params=[_RUN_ID],
                    extra=stale,
                )
            },
            "/api/v1/runs/{run_id}/files": {
                "get": _op(
                    "the run's files",
                    _json({"type": "object", "properties": {"files": {"type": "array"}}}),
                    params=[_RUN_ID],
                    extra={"404": "unknown run"},
                )
            },
            "/api/v1/runs/{run_id}/files/{name}": {
                "put": {
                    **_op(
                        "upload a file (streamed)",
                        _json(
                            {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "size": {"type": "integer"},
                                    "sha256": {"type": "string"},
                                },
                            }
                        ),
                        params=[
                            _RUN_ID,
                            _NAME,
                            {
                                "name": "incarnation",
                                "in": "query",
                                "required": True,
                                "schema": {"type": "integer"},
                            },
                        ],
                        extra={**stale, "413": "over the size limit"},
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                },
                "get": _op(
                    "download a file (streamed)",
                    {
                        "description": "the bytes",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    params=[_RUN_ID, _NAME],
                    extra={"404": "unknown run or file"},
                ),
            },
            "/api/v1/instances/{instance_id}/preempting": {
                "post": _op(
                    "mark every running run of an instance preempting",
                    _json(
                        {
                            "type": "object",
                            "properties": {
                                "marked": {"type": "array", "items": {"type": "string"}}
                            },
                        }
                    ),
                    body=INSTANCE_PREEMPTING,
                    params=[
                        {
                            "name": "instance_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                )
            },
            "/healthz": {
                "get": {
                    "summary": "liveness and database check",
                    "security": [],
                    "responses": {
                        "200": {"description": "OK"},
                        "503": {"description": "database unavailable"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {"200": {"description": "text exposition"}},
                }
            },
        },
    }
