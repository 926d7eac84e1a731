"""The sidecar's local HTTP endpoints: the notice (long-poll), health, metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .service import Sidecar

#: Longest long-poll a client may ask for, in seconds.
MAX_WAIT = 300.0

SIDECAR_KEY: web.AppKey[Sidecar] = web.AppKey("sidecar")


def _error(status: int, message: str) -> web.Response:
    code = {400: "bad_request", 404: "not_found"}.get(status, "error")
    return web.json_response({"error": code, "message": message}, status=status)


async def get_notice(request: web.Request) -> web.Response:
    """``GET /v1/notice[?wait=SECONDS[&after=VERSION]]``.

    Always 200 with ``{"preempting", "notice", "notices", "version"}``. With ``wait``
    the answer is held until preempting (or, with ``after``, until the version differs
    from ``after``: any notice or clearing), at most ``wait`` seconds.
    """
    board = request.app[SIDECAR_KEY].board
    try:
        wait = float(request.query.get("wait", "0"))
        after = int(request.query["after"]) if "after" in request.query else None
    except ValueError:
        return _error(400, "wait must be a number of seconds and after an integer version")
    if not 0 <= wait <= MAX_WAIT or wait != wait:
        return _error(400, f"wait must be between 0 and {MAX_WAIT:.0f} seconds")
    if after is not None and after < 0:
        return _error(400, "after must be a version number (0 or more)")
    if wait:
        await board.wait(wait, after)
    return web.json_response(board.snapshot())


async def get_health(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 while at least one source runs (or detection is still
    going on), else 503; the body has each source's polling health."""
    sidecar = request.app[SIDECAR_KEY]
    watcher = sidecar.watcher
    now = time.time()
    sources: dict[str, Any] = {}
    for name, h in list(watcher.health.items()):
        sources[name] = {
            "running": h.running,
            "polls": h.polls,
            "errors": h.errors,
            "seconds_since_ok": None if h.last_ok is None else round(now - h.last_ok, 3),
            "last_error": h.last_error,
        }
    ok = any(s["running"] for s in sources.values()) or not sidecar.detection_done
    body = {
        "status": "ok" if ok else "no source running",
        "preempting": sidecar.board.preempting,
        "instance_id": sidecar.instance_id,
        "sources": sources,
        "pending_marks": len(sidecar.marker.pending()) if sidecar.marker else 0,
    }
    return web.json_response(body, status=200 if ok else 503)


async def get_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition."""
    data = request.app[SIDECAR_KEY].metrics.render()
    return web.Response(body=data, headers={"Content-Type": "text/plain; version=0.0.4"})


def make_app(sidecar: Sidecar) -> web.Application:
    """The aiohttp application."""
    app = web.Application()
    app[SIDECAR_KEY] = sidecar
    app.router.add_get("/v1/notice", get_notice)
    app.router.add_get("/healthz", get_health)
    app.router.add_get("/metrics", get_metrics)
    return app
