"""Which machine this is: the instance ID and host name recorded on every run.

The instance ID comes from ``PREEMPTWATCH_INSTANCE_ID``, else from the first cloud source
whose ``fetch_instance_id(session)`` answers within a short timeout, else the host name.
The answer is cached for the life of the process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import threading

log = logging.getLogger("preemptwatch")

_lock = threading.Lock()
_instance_id: str | None = None


def host_name() -> str:
    """This machine's host name."""
    return socket.gethostname()


def instance_id(timeout: float = 1.0) -> str:
    """This machine's instance ID (cached after the first call)."""
    global _instance_id
    with _lock:
        if _instance_id is None:
            _instance_id = os.environ.get("PREEMPTWATCH_INSTANCE_ID") or _from_clouds(timeout)
            if not _instance_id:
                _instance_id = host_name()
        return _instance_id


def reset_cache() -> None:
    """Forget the cached instance ID (for tests and long-lived processes that move)."""
    global _instance_id
    with _lock:
        _instance_id = None


def _from_clouds(timeout: float) -> str | None:
    """Ask every cloud source at once; the first ID in source order wins."""
    from .client.loop import run_sync

    try:
        return run_sync(_ask_clouds(timeout), timeout=timeout + 2.0)
    except Exception as exc:
        log.debug("no cloud instance ID: %r", exc)
        return None


async def _ask_clouds(timeout: float) -> str | None:
    import aiohttp

    from .sources import CLOUD_SOURCES, source_class

    async def ask(name: str, session: aiohttp.ClientSession) -> str | None:
        try:
            fetch = getattr(source_class(name), "fetch_instance_id", None)
            if fetch is None:
                return None
            result = fetch(session)
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, timeout)
            return str(result) if result else None
        except Exception as exc:  # absent or unreachable: not this cloud
            log.debug("source %s gave no instance ID: %r", name, exc)
            return None

    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, trust_env=False) as session:
        answers = await asyncio.gather(*(ask(name, session) for name in CLOUD_SOURCES))
    return next((a for a in answers if a), None)
