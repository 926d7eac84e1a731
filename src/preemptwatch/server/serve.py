"""Running the server: bind, print the address (and a generated key, once), stop on
SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from .app import CONTEXT, create_app
from .config import ServerConfig

log = logging.getLogger("preemptwatch.server")


async def serve(config: ServerConfig, *, env_key: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    app = create_app(config, env_key=env_key)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await runner.setup()  # the startup hooks: migrations, first key, background tasks
    except Exception as exc:
        log.debug("startup failed", exc_info=True)
        print(f"preemptwatch server: cannot start on {config.db_url}: {exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    try:
        generated = app[CONTEXT].generated_key
        if generated:
            print(
                "Created project 'default' with API key (shown once, keep it):\n"
                f"  PREEMPTWATCH_API_KEY={generated}",
                flush=True,
            )
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            print(f"preemptwatch server on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
    return 0
