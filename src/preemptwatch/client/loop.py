"""The run client's private event loop, in one daemon thread per process.

The client's public API is synchronous (training scripts are), its HTTP is aiohttp: every
call is a coroutine run on this loop. The loop runs blocking helpers (DNS lookups, file
reads) inline rather than in a thread pool, so the client still works from ``atexit``
handlers, after the interpreter has shut the standard thread pools down.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None


class _InlineExecutor(ThreadPoolExecutor):
    """Runs each job at once in the calling thread (the loop's own thread)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def client_loop() -> asyncio.AbstractEventLoop:
    """The client's event loop, started on first use (and again in a forked child)."""
    global _loop, _thread, _pid
    with _lock:
        if _loop is not None and _pid == os.getpid() and _thread is not None and _thread.is_alive():
            return _loop
        loop = asyncio.new_event_loop()
        loop.set_default_executor(_InlineExecutor(max_workers=1))
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=main, name="preemptwatch-client", daemon=True)
        thread.start()
        ready.wait()
        _loop, _thread, _pid = loop, thread, os.getpid()
        return loop


def in_client_loop() -> bool:
    """Whether the caller runs on the client loop's thread."""
    return _thread is not None and threading.current_thread() is _thread


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the client loop and wait for its result."""
    if in_client_loop():
        coro.close()
        raise RuntimeError("a synchronous client call cannot run on the client's own loop")
    future = asyncio.run_coroutine_threadsafe(coro, client_loop())
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


def submit(coro: Coroutine[Any, Any, T]) -> Future[T]:
    """Schedule ``coro`` on the client loop without waiting for it."""
    return asyncio.run_coroutine_threadsafe(coro, client_loop())
