"""Fixtures of the run client's tests: an isolated environment and real server processes."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import free_port, pg_database

from preemptwatch import marks, platform
from preemptwatch.client import exithooks, run
from preemptwatch.server.testing import ServerProcess

API_KEY = "pw-test-key-client"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No PREEMPTWATCH_* settings from outside, a spool and working directory of our own,
    a fixed instance ID; and no run, marker or exit hook left behind."""
    for name in list(os.environ):
        if name.startswith("PREEMPTWATCH_"):
            monkeypatch.delenv(name)
    spool = tmp_path / "spool"
    monkeypatch.setenv("PREEMPTWATCH_SPOOL_DIR", str(spool))
    monkeypatch.setenv("PREEMPTWATCH_INSTANCE_ID", "i-test")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    platform.reset_cache()
    yield workdir
    active = run.active_run()
    if active is not None:
        active.finish(0, timeout=5)
    for marker in marks.markers():
        if getattr(marker, "__self__", None) is not None and isinstance(marker.__self__, run.Run):
            marks.unregister_marker(marker)
    exithooks.uninstall()
    platform.reset_cache()


Server = ServerProcess


def start_server(
    db_url: str, workdir: Path, *, heartbeat_timeout: float = 300.0, port: int | None = None
) -> Server:
    """Start the server on a free port (or ``port``) and wait until ``/healthz`` answers."""
    args = ["--heartbeat-timeout", str(heartbeat_timeout)]
    return ServerProcess(db_url, api_key=API_KEY, workdir=workdir, args=args, port=port).start()


def stop_server(server: Server) -> None:
    """Stop the process (SIGTERM, then SIGKILL)."""
    server.stop()


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One real server per engine for the whole session (tests use run IDs of their own)."""
    workdir = tmp_path_factory.mktemp(f"server-{request.param}")
    if request.param == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{workdir / 'preemptwatch.db'}"])
    else:
        urls = pg_database()
    db_url = next(urls)
    srv = start_server(db_url, workdir)
    try:
        yield srv
    finally:
        stop_server(srv)
        for _ in urls:  # drops the PostgreSQL database
            pass


@pytest.fixture
def env_server(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The server, also named by PREEMPTWATCH_SERVER and PREEMPTWATCH_API_KEY."""
    monkeypatch.setenv("PREEMPTWATCH_SERVER", server.url)
    monkeypatch.setenv("PREEMPTWATCH_API_KEY", server.api_key)
    return server


def new_id(prefix: str = "run") -> str:
    """A run ID no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Reply:
    """One scripted answer: a status and a JSON body, or a dropped connection."""

    status: int = 200
    body: object = None
    drop: bool = False


class ScriptedServer:
    """A real HTTP server on loopback answering each request with the next scripted reply
    for its method and path (the last reply repeats); records every request."""

    def __init__(self) -> None:
        import asyncio
        import threading

        from aiohttp import web

        self.replies: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self._loop.run_until_complete(site.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        ready.wait(10)

    def script(self, method: str, path: str, *replies: Reply) -> None:
        self.replies[(method, path)] = list(replies)

    def calls(self, method: str, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for m, p, h, b in self.requests if (m, p) == (method, path)]

    async def _handle(self, request: object) -> object:
        from aiohttp import web

        assert isinstance(request, web.Request)
        body = await request.read()
        self.requests.append((request.method, request.path, dict(request.headers), body))
        queue = self.replies.get((request.method, request.path)) or [
            Reply(404, {"error": "not_found", "message": "nothing scripted"})
        ]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if isinstance(reply.body, (bytes, str)):
            return web.Response(status=reply.status, body=reply.body)
        return web.json_response(reply.body, status=reply.status)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    """A scripted HTTP server for single exchanges."""
    srv = ScriptedServer()
    try:
        yield srv
    finally:
        srv.close()


def wait_for(condition: object, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s: {condition}")
        time.sleep(interval)
