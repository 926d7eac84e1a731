"""Helpers of the sweep tests: a server application on its own thread with a controlled
clock (fast, deterministic), and clients for it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from preemptwatch.client.api import ApiClient
from preemptwatch.server import testing
from preemptwatch.server.app import CONTEXT, ServerContext, create_app
from preemptwatch.server.config import ServerConfig
from preemptwatch.simulate import SimulatorThread
from preemptwatch.sweeps.api import SweepApi

API_KEY = "pw-sweeps-test-key-0123456789abcdef"


@dataclass
class _Holder:
    application: web.Application

    def app(self) -> web.Application:
        return self.application


@dataclass
class ServerThread:
    """A server app served from a thread; ``run(coro_fn)`` runs on its loop."""

    url: str
    thread: SimulatorThread
    app: web.Application
    clock: testing.ManualClock

    @property
    def ctx(self) -> ServerContext:
        return self.app[CONTEXT]

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.thread.loop).result(60)

    def reap(self) -> Any:
        return self.run(self.ctx.store.reap(self.clock()))

    def client(self) -> ApiClient:
        return ApiClient(self.url, API_KEY, timeout=30, retry_budget=30)

    def sweeps(self) -> SweepApi:
        return SweepApi(self.client())


def start_server_thread(db_url: str, tmp: Path, heartbeat_timeout: float = 60.0) -> ServerThread:
    clock = testing.ManualClock(1_800_000_000.0)
    config = ServerConfig(
        db_url=db_url,
        heartbeat_timeout=heartbeat_timeout,
        storage_url=str(tmp / "files"),
        reap_interval=3600,
    )
    app = create_app(config, clock=clock, env_key=API_KEY, background=False)
    thread = SimulatorThread(_Holder(app))
    url = thread.start()
    return ServerThread(url=url, thread=thread, app=app, clock=clock)


class ServerProcess(testing.ServerProcess):
    """A real ``preemptwatch server`` process with the sweep tests' API key."""

    def client(self, **kwargs: Any) -> ApiClient:
        return ApiClient(self.url, self.api_key, **kwargs)


def start_server_process(
    db_url: str,
    tmp: Path,
    *,
    heartbeat_timeout: float = 60.0,
    reap_interval: float = 5.0,
    name: str = "server",
) -> ServerProcess:
    """Start ``preemptwatch server`` on a free port and wait for ``/healthz``."""
    args = ["--heartbeat-timeout", str(heartbeat_timeout), "--reap-interval", str(reap_interval)]
    server = ServerProcess(
        db_url,
        api_key=API_KEY,
        workdir=tmp,
        args=args,
        env={"PREEMPTWATCH_DATA_DIR": str(tmp)},
        name=name,
    )
    return server.start(timeout=60)
