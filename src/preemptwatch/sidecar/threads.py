"""Blocking calls off the event loop, in daemon threads.

A pool thread would hold up the process at exit (``asyncio.run`` waits for the default
executor) while a blocking call retries against a server that is down or a queue's long
poll runs; a daemon thread does not, and its result is simply dropped once the caller
has gone away.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_daemon_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run ``fn(*args, **kwargs)`` in a new daemon thread; await the returned future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args, **kwargs), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    name = getattr(fn, "__name__", "call")
    threading.Thread(target=work, name=f"preemptwatch-{name}", daemon=True).start()
    return future
