"""HTTP routes of sweeps and sweep agents (the "Sweeps" section of ``docs/http-api.md``)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ..errors import BadRequest
from .app import CONTEXT, PROJECT, read_body
from .store import Project
from .sweeps import TRANSITIONS, SweepStore
from .validation import Field, Spec, spec_schema

SWEEP_STORE = web.AppKey("preemptwatch_sweep_store", SweepStore)

CREATE_SWEEP: Spec = {
    "config": Field("object", required=True, description="the sweep file (W&B format) as JSON")
}
REGISTER_AGENT: Spec = {
    "host": Field("string", nullable=True, description="host name of the agent"),
    "pid": Field("integer", nullable=True),
}
EMPTY: Spec = {}
EXIT: Spec = {"exit_code": Field("integer", required=True, description="the child's exit code")}

_ID = re.compile(r"^\w{1,64}$")


def _store(request: web.Request) -> SweepStore:
    return request.app[SWEEP_STORE]


def _project(request: web.Request) -> int:
    project: Project = request[PROJECT]
    return project.id


def _id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not _ID.match(value):
        raise BadRequest(f"{name} {value[:80]!r} is not a valid ID", field=name)
    return value


async def create_sweep(request: web.Request) -> web.Response:
    """POST /api/v1/sweeps"""
    body = await read_body(request, CREATE_SWEEP)
    sweep = await _store(request).create(_project(request), body["config"])
    return web.json_response(sweep, status=201)


async def list_sweeps(request: web.Request) -> web.Response:
    """GET /api/v1/sweeps"""
    return web.json_response({"sweeps": await _store(request).list_sweeps(_project(request))})


async def get_sweep(request: web.Request) -> web.Response:
    """GET /api/v1/sweeps/{sweep_id}"""
    return web.json_response(await _store(request).get(_project(request), _id(request, "sweep_id")))


async def transition(request: web.Request) -> web.Response:
    """POST /api/v1/sweeps/{sweep_id}/{pause|resume|cancel}"""
    await read_body(request, EMPTY)
    action = request.match_info["action"]
    return web.json_response(
        await _store(request).transition(_project(request), _id(request, "sweep_id"), action)
    )


async def register_agent(request: web.Request) -> web.Response:
    """POST /api/v1/sweeps/{sweep_id}/agents"""
    body = await read_body(request, REGISTER_AGENT)
    agent = await _store(request).register_agent(
        _project(request), _id(request, "sweep_id"), body.get("host"), body.get("pid")
    )
    return web.json_response(agent, status=201)


async def agent_heartbeat(request: web.Request) -> web.Response:
    """POST /api/v1/sweeps/{sweep_id}/agents/{agent_id}/heartbeat"""
    await read_body(request, EMPTY)
    answer = await _store(request).heartbeat(
        _project(request), _id(request, "sweep_id"), _id(request, "agent_id")
    )
    return web.json_response(answer)


async def next_run(request: web.Request) -> web.Response:
    """POST /api/v1/sweeps/{sweep_id}/agents/{agent_id}/next"""
    await read_body(request, EMPTY)
    answer = await _store(request).next_run(
        _project(request), _id(request, "sweep_id"), _id(request, "agent_id")
    )
    return web.json_response(answer)


async def report_exit(request: web.Request) -> web.Response:
    """POST /api/v1/sweeps/{sweep_id}/agents/{agent_id}/runs/{run_id}/exit"""
    body = await read_body(request, EXIT)
    answer = await _store(request).report_exit(
        _project(request),
        _id(request, "sweep_id"),
        _id(request, "agent_id"),
        _id(request, "run_id"),
        body["exit_code"],
    )
    return web.json_response(answer)


def _op(summary: str, body: Spec | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
    if body is not None:
        op["requestBody"] = {"content": {"application/json": {"schema": spec_schema(body)}}}
    return op


def _openapi_paths() -> dict[str, Any]:
    base = "/api/v1/sweeps"
    agent = base + "/{sweep_id}/agents/{agent_id}"
    paths: dict[str, Any] = {
        base: {
            "post": _op("create a sweep from a W&B-format sweep config", CREATE_SWEEP),
            "get": _op("list the project's sweeps"),
        },
        base + "/{sweep_id}": {"get": _op("a sweep with its counts")},
        base + "/{sweep_id}/agents": {"post": _op("register an agent", REGISTER_AGENT)},
        agent + "/heartbeat": {"post": _op("agent heartbeat (covers its current run)")},
        agent + "/next": {"post": _op("claim the next run: queue first, then search")},
        agent + "/runs/{run_id}/exit": {"post": _op("report the child's exit code", EXIT)},
    }
    for action in TRANSITIONS:
        paths[f"{base}/{{sweep_id}}/{action}"] = {"post": _op(f"{action} the sweep")}
    return paths


def add_sweep_routes(app: web.Application) -> None:
    """Register the sweep routes (and their OpenAPI paths) on the server application."""
    base = "/api/v1/sweeps"
    agent = base + "/{sweep_id}/agents/{agent_id}"
    app.router.add_routes(
        [
            web.post(base, create_sweep),
            web.get(base, list_sweeps),
            web.get(base + "/{sweep_id}", get_sweep),
            web.post(base + "/{sweep_id}/{action:pause|resume|cancel}", transition),
            web.post(base + "/{sweep_id}/agents", register_agent),
            web.post(agent + "/heartbeat", agent_heartbeat),
            web.post(agent + "/next", next_run),
            web.post(agent + "/runs/{run_id}/exit", report_exit),
        ]
    )
    ctx = app[CONTEXT]
    app[SWEEP_STORE] = SweepStore(
        ctx.db, heartbeat_timeout=ctx.config.heartbeat_timeout, clock=ctx.store.clock
    )
    ctx.openapi.setdefault("paths", {}).update(_openapi_paths())
