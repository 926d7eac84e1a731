"""The `Sidecar`: one watcher per machine, and what it does on a notice."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import platform
from ..client.settings import spool_dir
from ..notice import Notice
from ..simulate import serve
from ..sources import CLOUD_SOURCES, Source, make_source
from ..watcher import Watcher
from .actions import ExecHook, SignalTargets
from .board import NoticeBoard
from .credentials import TokenSource
from .http import make_app
from .mark import InstanceMarker
from .metrics import Metrics
from .threads import in_daemon_thread
from .webhook import Webhook

log = logging.getLogger("preemptwatch.sidecar")

DEFAULT_PORT = 8474


def default_spool_dir() -> Path:
    """``PREEMPTWATCH_SPOOL_DIR``, else ``$STATE_DIRECTORY/spool`` under systemd, else the
    run client's spool directory (so marks that run clients spooled are delivered too)."""
    state = os.environ.get("STATE_DIRECTORY")
    if state and not os.environ.get("PREEMPTWATCH_SPOOL_DIR"):
        return Path(state.split(":")[0]) / "spool"
    return spool_dir()


@dataclass
class SidecarConfig:
    """Everything ``preemptwatch watch`` can be told."""

    #: Source names (or ready `Source` objects); None: detect the cloud.
    sources: Sequence[str | Source] | None = None
    interval: float | None = None
    count_rebalance: bool = False
    maintenance_lead: float = 600.0
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    server: str | None = None
    token: TokenSource | None = None
    instance_id: str | None = None
    spool_dir: Path = field(default_factory=default_spool_dir)
    signals: SignalTargets | None = None
    exec_hook: ExecHook | None = None
    webhook: Webhook | None = None
    respool_interval: float = 60.0
    detect_timeout: float = 2.0
    http_timeout: float = 2.0


class Sidecar:
    """Runs the sources of this machine; on the first notice that counts it marks the
    instance's runs preempting, signals, runs the hook and posts the webhook (all at
    once), and serves the notice on ``GET /v1/notice``."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        names = list(dict.fromkeys(config.sources)) if config.sources else []
        built: list[Source] = []
        for name in names:
            if not isinstance(name, str):
                built.append(name)
                continue
            options: dict[str, Any] = {}
            if config.interval is not None and name in ("ec2", "gcp", "azure", "sidecar"):
                options["interval"] = config.interval
            built.append(make_source(name, **options))  # unknown names raise ValueError
        self.watcher = Watcher(
            built,
            detect=() if names else CLOUD_SOURCES,
            count_rebalance=config.count_rebalance,
            maintenance_lead=config.maintenance_lead,
            mark=False,
            http_timeout=config.http_timeout,
            detect_timeout=config.detect_timeout,
        )
        self.board = NoticeBoard()
        self.metrics = Metrics(self.watcher)
        self.watcher.add_listener(self.board.listener)
        self.watcher.add_listener(self.metrics.listener)
        self.watcher.add_listener(self._on_event)
        self.instance_id: str | None = config.instance_id
        self.marker: InstanceMarker | None = None
        self.detection_done = bool(names)
        self.url: str | None = None
        self._instance_ready: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Start the watcher and the HTTP server; returns the server's URL."""
        self._stopped = asyncio.Event()
        self._instance_ready = asyncio.Event()
        # Bind first: a port in use fails before anything else has started.
        self._runner = await serve(make_app(self), self.config.host, self.config.port)
        try:
            await self.watcher.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        if not self.detection_done:
            self._spawn(self._await_detection())
        self._spawn(self._find_instance())
        if not self.config.server:
            log.warning("no server given: runs will not be marked (use --server)")
        log.warning("preemptwatch sidecar serving %s/v1/notice", self.url)
        return self.url

    async def stop(self) -> None:
        """Stop everything; undelivered marks stay in the spool."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.watcher.aclose()
        self.board.close()
        if self.marker is not None:
            self.marker.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._stopped is not None:
            self._stopped.set()

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_closed(self) -> None:
        """Wait until :meth:`stop` is called."""
        assert self._stopped is not None
        await self._stopped.wait()

    # ---------------------------------------------------------------- internals

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _await_detection(self) -> None:
        """Note when cloud detection has had its chance (for /healthz)."""
        await asyncio.sleep(self.config.detect_timeout + 0.5)
        self.detection_done = True
        if not self.watcher.sources:
            log.error(
                "no cloud metadata service answered; nothing to watch (name sources with --sources)"
            )

    async def _find_instance(self) -> None:
        """Learn the instance ID, then deliver spooled marks (run clients' ones again
        every ``respool_interval`` seconds)."""
        assert self._instance_ready is not None
        if not self.instance_id:
            # The same rule the run client records on each run: PREEMPTWATCH_INSTANCE_ID,
            # else the cloud's instance ID, else the host name.
            self.instance_id = await in_daemon_thread(platform.instance_id, 2.0)
            log.warning("instance ID %s", self.instance_id)
        if self.config.server:
            assert self.config.token is not None, "a server needs a token source"
            self.marker = InstanceMarker(
                self.config.server,
                self.config.token,
                self.instance_id,
                self.config.spool_dir,
                on_done=lambda ok, n: self.metrics.action_done("mark", ok, n),
            )
        self._instance_ready.set()
        if self.marker is not None:
            await self.marker.deliver_pending()
            while True:
                await asyncio.sleep(self.config.respool_interval)
                await self.marker.deliver_run_marks()

    def _on_event(self, event: str, data: Any) -> None:
        if event == "preempting":
            self._act(data)

    def _act(self, notice: Notice) -> None:
        """Start every action at once; signals first, as they cost nothing."""
        config = self.config
        if config.signals:
            delivered, failed = config.signals.send()
            self.metrics.action_done("signal", failed == 0 and delivered > 0, notice)
        if config.server:
            self._spawn(self._mark(notice))
        if config.exec_hook:
            self._spawn(self._exec(config.exec_hook, notice))
        if config.webhook:
            self._spawn(self._webhook(config.webhook, notice))

    async def _mark(self, notice: Notice) -> None:
        assert self._instance_ready is not None
        await self._instance_ready.wait()
        assert self.marker is not None
        await self.marker.mark(notice)

    async def _exec(self, hook: ExecHook, notice: Notice) -> None:
        code = await hook.run(notice, self.instance_id)
        self.metrics.action_done("exec", code == 0, notice)

    async def _webhook(self, webhook: Webhook, notice: Notice) -> None:
        ok = await webhook.post(notice, self.instance_id)
        self.metrics.action_done("webhook", ok, notice)
