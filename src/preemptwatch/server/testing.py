"""Helpers to run the server in tests: a real ``preemptwatch server`` process, or an
in-process server on a free port with an injectable clock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from .app import CONTEXT, ServerContext, create_app
from .config import ServerConfig


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``preemptwatch server`` in a child process on 127.0.0.1 and a free port.

    ``url``, ``api_key`` and ``db_url`` are what clients need; `start`, `stop` (SIGTERM)
    and `kill` (SIGKILL) control the process; the port stays the same across restarts.
    ``args`` are extra command-line options, ``env`` extra environment variables; the
    output goes to ``log_path`` (``<workdir>/<name>-<port>.log``), read it with `log`.
    """

    def __init__(
        self,
        db_url: str,
        *,
        api_key: str = "pw-test-key",
        workdir: Path | None = None,
        storage: str | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
        name: str = "server",
    ) -> None:
        self.db_url = db_url
        self.api_key = api_key
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pw-server-"))
        self.storage = storage or str(self.workdir / "files")
        self.args = list(args)
        self.env = env or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / f"{name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            sys.executable,
            "-m",
            "preemptwatch",
            "server",
            "--db",
            self.db_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage",
            self.storage,
            *self.args,
        ]

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the process and wait until ``/healthz`` answers 200."""
        env = {**os.environ, **self.env, "PREEMPTWATCH_API_KEY": self.api_key}
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not answer /healthz within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(10)

    def log(self) -> str:
        """Everything the process printed."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def headers(self) -> dict[str, str]:
        """The Authorization header of the API key."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ManualClock:
    """A clock tests move by hand: ``clock()`` is the current time."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


class InProcessServer:
    """The server app in this event loop on a free port, with the reaper left to the test
    (``await server.reap(now)``) and an injectable clock. Use ``async with``."""

    def __init__(
        self,
        db_url: str,
        storage_url: str,
        *,
        api_key: str = "pw-test-key",
        clock: Callable[[], float] = time.time,
        **config: Any,
    ) -> None:
        self.db_url = db_url
        self.api_key = api_key
        self.config = ServerConfig(db_url=db_url, storage_url=storage_url, port=0, **config)
        self.app = create_app(self.config, clock=clock, env_key=api_key, background=False)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""

    @property
    def ctx(self) -> ServerContext:
        """The app's shared objects (store, reaper, config...)."""
        return self.app[CONTEXT]

    def headers(self) -> dict[str, str]:
        """The Authorization header of the API key."""
        return {"Authorization": f"Bearer {self.api_key}"}

    async def reap(self, now: float | None = None) -> Any:
        """One reaper pass at ``now`` (default: the clock)."""
        return await self.ctx.reaper.run_once(now)

    async def __aenter__(self) -> InProcessServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
