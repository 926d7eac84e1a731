"""Local metadata-service simulators for rehearsals and tests.

Each provider module (``ec2``, ``gcp``, ``azure``) defines a simulator class with
``app() -> aiohttp.web.Application`` plus a small control API under ``/_control/``
(schedule a notice after N seconds, clear it, inject faults), and ``add_arguments`` /
``from_args`` for ``preemptwatch simulate NAME``. `SimulatorThread` serves any of them
on a free loopback port from a background thread, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from typing import Any, Protocol

from aiohttp import web

PROVIDERS = ("ec2", "gcp", "azure")


class Simulator(Protocol):
    """What a provider simulator offers."""

    def app(self) -> web.Application:
        """The aiohttp application serving the metadata paths and ``/_control/``."""


def simulator_module(name: str) -> Any:
    """The module of the simulator for ``name`` (one of `PROVIDERS`)."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
    return importlib.import_module(f"preemptwatch.simulate.{name}")


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> web.AppRunner:
    """Start serving ``app``; the bound port is ``runner.addresses[0][1]``."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


class SimulatorThread:
    """Serve a simulator from a daemon thread: ``with SimulatorThread(sim) as url: ...``."""

    def __init__(self, simulator: Simulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = simulator
        self.host = host
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        """Root URL, as ``PREEMPTWATCH_*_METADATA_URL`` expects it."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Start serving; returns the root URL."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            serve(self.simulator.app(), self.host, self.port), self.loop
        )
        self._runner = future.result(10)
        self.port = int(self._runner.addresses[0][1])
        return self.url

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the simulator's loop (to change its state safely)."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        """Stop serving and end the thread."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
