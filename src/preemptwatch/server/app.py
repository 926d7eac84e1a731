"""The aiohttp application: routes of ``docs/http-api.md``, auth and error middlewares,
body limits, and the background tasks (heartbeat batcher, reaper)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import tenacity
from aiohttp import web

from ..errors import BadRequest, RequestError, TooLarge, Unauthorized
from ..extras import import_extra
from .auth import ApiKeyAuth, Authenticator
from .config import ServerConfig
from .db import Database
from .heartbeats import HeartbeatBatcher
from .ids import check_file_name, normalize_run_id
from .metrics import Metrics
from .openapi import build_openapi
from .reaper import Reaper
from .schema import RUN_STATES
from .storage import CHUNK, Storage, new_key, open_storage
from .store import Project, RunStore, rfc3339, run_view
from .validation import (
    CREATE_RUN,
    FINISH,
    HEARTBEAT,
    INSTANCE_PREEMPTING,
    LOG,
    PREEMPTING,
    Spec,
    check_body,
    parse_json,
)

log = logging.getLogger("preemptwatch.server")

PUBLIC_PATHS = frozenset({"/healthz", "/metrics", "/api/v1/openapi.json"})
MAX_LIST_LIMIT = 1000


@dataclass
class ServerContext:
    """Everything the handlers share."""

    config: ServerConfig
    db: Database
    store: RunStore
    storage: Storage
    metrics: Metrics
    batcher: HeartbeatBatcher
    reaper: Reaper
    authenticators: list[Authenticator]
    env_key: str | None = None
    background: bool = True
    #: The first API key, when the server generated it at start (print it once).
    generated_key: str | None = None
    openapi: dict[str, Any] = field(default_factory=build_openapi)


CONTEXT = web.AppKey("preemptwatch_context", ServerContext)
PROJECT = web.RequestKey("preemptwatch_project", Project)


def create_app(
    config: ServerConfig,
    *,
    clock: Callable[[], float] = time.time,
    env_key: str | None = None,
    authenticators: Sequence[Authenticator] = (),
    storage: Storage | None = None,
    background: bool = True,
) -> web.Application:
    """The server application. ``env_key`` is the first API key on an empty database;
    ``authenticators`` are tried before API keys; ``background=False`` leaves the reaper
    off (tests then call ``ctx.reaper.run_once(now)`` themselves)."""
    db = Database(config.db_url)
    store = RunStore(db, heartbeat_timeout=config.heartbeat_timeout, clock=clock)
    metrics = Metrics()
    ctx = ServerContext(
        config=config,
        db=db,
        store=store,
        storage=storage if storage is not None else open_storage(config.storage_url),
        metrics=metrics,
        batcher=HeartbeatBatcher(store, metrics),
        reaper=Reaper(store, config.reap_interval, metrics),
        authenticators=[*authenticators, ApiKeyAuth(store)],
        env_key=env_key,
        background=background,
    )
    app = web.Application(middlewares=[api_middleware], client_max_size=config.json_limit)
    app[CONTEXT] = ctx
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    add_routes(app)
    from .sweep_routes import add_sweep_routes  # sweeps: routes of their own module

    add_sweep_routes(app)
    if config.gcp_identity_audience:  # GCP identity tokens (the gcp extra)
        import_extra("google.auth", "gcp", "--gcp-identity-audience")
        import_extra("cryptography", "gcp", "--gcp-identity-audience")
        from .identity import install_identity_auth

        install_identity_auth(app)
    if config.sqs_queue:  # EC2 events from SQS (the aws extra)
        import_extra("boto3", "aws", "--sqs-queue")
        from .sqs import install_sqs_consumer

        install_sqs_consumer(app)
    return app


async def _startup(app: web.Application) -> None:
    ctx = app[CONTEXT]

    async def bootstrap(conn: Any) -> str | None:
        return await ctx.store.bootstrap(conn, ctx.env_key)

    if ctx.db.sqlite:
        ctx.generated_key = await ctx.db.migrate(bootstrap)
    else:  # replicas may start before their database does: wait for it (~30 s)
        async for attempt in tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(
                (OSError, sa.exc.OperationalError, sa.exc.InterfaceError)
            ),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=5),
            stop=tenacity.stop_after_delay(30),
            reraise=True,
        ):
            with attempt:
                ctx.generated_key = await ctx.db.migrate(bootstrap)
    ctx.batcher.start()
    if ctx.background:
        ctx.reaper.start()


async def _cleanup(app: web.Application) -> None:
    ctx = app[CONTEXT]
    await ctx.reaper.stop()
    await ctx.batcher.stop()
    await ctx.db.dispose()


# -- middlewares ----------------------------------------------------------------------------

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication (each authenticator in turn; 401 when none recognises the request),
    every error as ``{"error", "message"}``, and request metrics."""
    started = time.perf_counter()
    ctx = request.app[CONTEXT]
    try:
        if request.path not in PUBLIC_PATHS:
            request[PROJECT] = await _authenticate(request, ctx.authenticators)
        response = await handler(request)
    except RequestError as exc:
        response = web.json_response(exc.to_json(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_error(request, exc)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = web.json_response(
            {"error": "internal", "message": "internal server error; see the server log"},
            status=500,
        )
    ctx.metrics.observe_request(request, response.status, time.perf_counter() - started)
    return response


async def _authenticate(request: web.Request, authenticators: list[Authenticator]) -> Project:
    for authenticate in authenticators:
        project = await authenticate(request)
        if project is not None:
            return project
    if "Authorization" in request.headers:
        raise Unauthorized("the API key is not valid")
    raise Unauthorized("missing credentials: send 'Authorization: Bearer <api key>'")


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    code = _HTTP_CODES.get(exc.status, "http_error")
    message = exc.reason
    if exc.status == 404:
        message = f"no route {request.method} {request.path}; see /api/v1/openapi.json"
    elif exc.status == 413:
        message = "the request body is over the server's limit"
    allow = exc.headers.get("Allow")
    return web.json_response(
        {"error": code, "message": message},
        status=exc.status,
        headers={"Allow": allow} if allow else None,
    )


# -- request helpers ------------------------------------------------------------------------


async def read_body(request: web.Request, spec: Spec) -> dict[str, Any]:
    """The JSON body, checked against ``spec``; 413 over the JSON limit."""
    limit = request.app[CONTEXT].config.json_limit
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise TooLarge(f"the body is over the limit of {limit} bytes") from None
    return check_body(parse_json(raw) if raw.strip() else {}, spec)


def _ctx(request: web.Request) -> ServerContext:
    return request.app[CONTEXT]


def _project(request: web.Request) -> Project:
    return request[PROJECT]


def _run_id(request: web.Request) -> str:
    return normalize_run_id(request.match_info["run_id"])


def _opt_id(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    return normalize_run_id(value, field=name) if value is not None else None


def _view(request: web.Request, row: Any, status: int = 200) -> web.Response:
    ctx = _ctx(request)
    return web.json_response(
        run_view(row, ctx.config.heartbeat_timeout, _project(request).name), status=status
    )


def _query_int(request: web.Request, name: str, lo: int, hi: int, default: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"query parameter {name!r} is required", field=name)
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be an integer", field=name) from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name!r} must be in {lo}..{hi}", field=name)
    return value


# -- handlers -------------------------------------------------------------------------------


async def create_run(request: web.Request) -> web.Response:
    """POST /api/v1/runs"""
    body = await read_body(request, CREATE_RUN)
    row, created = await _ctx(request).store.create_or_resume(
        _project(request).id,
        _opt_id(body, "id"),
        body.get("resume") or "never",
        config=body.get("config"),
        meta=body.get("meta"),
        instance_id=body.get("instance_id"),
        host=body.get("host"),
        sweep_id=_opt_id(body, "sweep_id"),
    )
    return _view(request, row, 201 if created else 200)


async def list_runs(request: web.Request) -> web.Response:
    """GET /api/v1/runs"""
    state = request.query.get("state")
    if state is not None and state not in RUN_STATES:
        raise BadRequest(f"state must be one of {', '.join(RUN_STATES)}", field="state")
    rows = await _ctx(request).store.list_runs(
        _project(request).id,
        state=state,
        sweep_id=request.query.get("sweep_id"),
        instance_id=request.query.get("instance_id"),
        limit=_query_int(request, "limit", 1, MAX_LIST_LIMIT, 100),
    )
    ctx, name = _ctx(request), _project(request).name
    return web.json_response(
        {"runs": [run_view(r, ctx.config.heartbeat_timeout, name) for r in rows]}
    )


async def get_run(request: web.Request) -> web.Response:
    """GET /api/v1/runs/{id}"""
    return _view(request, await _ctx(request).store.get_run(_project(request).id, _run_id(request)))


async def heartbeat(request: web.Request) -> web.Response:
    """POST /api/v1/runs/{id}/heartbeat"""
    body = await read_body(request, HEARTBEAT)
    key = (_project(request).id, _run_id(request), body["incarnation"])
    state, preempting = await _ctx(request).batcher.beat(key)
    return web.json_response({"state": state, "preempting": preempting})


async def log_step(request: web.Request) -> web.Response:
    """POST /api/v1/runs/{id}/log"""
    body = await read_body(request, LOG)
    step = body.get("step")
    if step is not None and step < 0:
        raise BadRequest("field 'step' must be 0 or more", field="step")
    new_step = await _ctx(request).store.log(
        _project(request).id, _run_id(request), body["incarnation"], body["data"], step
    )
    return web.json_response({"step": new_step})


async def get_history(request: web.Request) -> web.Response:
    """GET /api/v1/runs/{id}/history"""
    rows = await _ctx(request).store.history(_project(request).id, _run_id(request))
    return web.json_response(
        {
            "history": [
                {
                    "step": r["step"],
                    "data": r["data"],
                    "incarnation": r["incarnation"],
                    "time": rfc3339(r["time"]),
                }
                for r in rows
            ]
        }
    )


async def mark_preempting(request: web.Request) -> web.Response:
    """POST /api/v1/runs/{id}/preempting"""
    body = await read_body(request, PREEMPTING)
    row = await _ctx(request).store.mark_preempting(
        _project(request).id, _run_id(request), body["incarnation"], body.get("notice")
    )
    return _view(request, row)


async def finish(request: web.Request) -> web.Response:
    """POST /api/v1/runs/{id}/finish"""
    body = await read_body(request, FINISH)
    row = await _ctx(request).store.finish(
        _project(request).id, _run_id(request), body["incarnation"], body["exit_code"]
    )
    return _view(request, row)


async def mark_instance(request: web.Request) -> web.Response:
    """POST /api/v1/instances/{instance_id}/preempting"""
    instance_id = request.match_info["instance_id"]
    if not 0 < len(instance_id) <= 255 or not instance_id.isprintable():
        raise BadRequest("instance_id must be 1-255 printable characters", field="instance_id")
    body = await read_body(request, INSTANCE_PREEMPTING)
    marked = await _ctx(request).store.mark_instance(
        _project(request).id, instance_id, body.get("notice")
    )
    return web.json_response({"marked": marked})


async def put_file(request: web.Request) -> web.Response:
    """PUT /api/v1/runs/{id}/files/{name}?incarnation=N: the body is streamed to storage,
    counted and hashed on the way; over the size limit it is 413 and nothing is kept."""
    ctx = _ctx(request)
    project_id, run_id = _project(request).id, _run_id(request)
    name = check_file_name(request.match_info["name"])
    incarnation = _query_int(request, "incarnation", 1, 2**31 - 1, None)
    limit = ctx.config.max_file_size
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the file is {request.content_length} bytes; the limit is {limit}")
    await ctx.store.check_writer(project_id, run_id, incarnation)
    hasher = hashlib.sha256()
    size = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the file is over the limit of {limit} bytes")
            hasher.update(chunk)
            yield chunk

    key = new_key(project_id, run_id)
    await ctx.storage.save(key, chunks())
    try:
        old = await ctx.store.record_file(
            project_id,
            run_id,
            incarnation,
            name,
            size=size,
            sha256=hasher.hexdigest(),
            storage_key=key,
        )
    except BaseException:
        await ctx.storage.delete(key)
        raise
    if old is not None:
        await ctx.storage.delete(old)
    return web.json_response({"name": name, "size": size, "sha256": hasher.hexdigest()})


async def list_files(request: web.Request) -> web.Response:
    """GET /api/v1/runs/{id}/files"""
    rows = await _ctx(request).store.list_files(_project(request).id, _run_id(request))
    return web.json_response(
        {
            "files": [
                {
                    "name": r["name"],
                    "size": r["size"],
                    "sha256": r["sha256"],
                    "updated_at": rfc3339(r["updated_at"]),
                }
                for r in rows
            ]
        }
    )


async def get_file(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/runs/{id}/files/{name}: streamed from storage."""
    ctx = _ctx(request)
    name = check_file_name(request.match_info["name"])
    row = await ctx.store.get_file(_project(request).id, _run_id(request), name)
    chunks = ctx.storage.open(row["storage_key"])
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(row["size"]),
            "ETag": f'"{row["sha256"]}"',
            "X-Checksum-Sha256": row["sha256"],
        }
    )
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 when the database answers."""
    try:
        async with _ctx(request).db.read() as conn:
            await conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        return web.json_response({"status": "unavailable", "message": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics (Prometheus)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return web.Response(
        body=_ctx(request).metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def openapi(request: web.Request) -> web.Response:
    """GET /api/v1/openapi.json"""
    return web.json_response(_ctx(request).openapi)


def add_routes(app: web.Application) -> None:
    """The routes of ``docs/http-api.md``."""
    runs = "/api/v1/runs/{run_id}"
    app.router.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/api/v1/openapi.json", openapi),
            web.post("/api/v1/runs", create_run),
            web.get("/api/v1/runs", list_runs),
            web.get(runs, get_run),
            web.post(f"{runs}/heartbeat", heartbeat),
            web.post(f"{runs}/log", log_step),
            web.get(f"{runs}/history", get_history),
            web.post(f"{runs}/preempting", mark_preempting),
            web.post(f"{runs}/finish", finish),
            web.get(f"{runs}/files", list_files),
            web.put(runs + "/files/{name:.+}", put_file),
            web.get(runs + "/files/{name:.+}", get_file),
            web.post("/api/v1/instances/{instance_id}/preempting", mark_instance),
        ]
    )


__all__ = ["CONTEXT", "PROJECT", "ServerContext", "add_routes", "create_app", "read_body"]
