"""Markers: what gets told "this run is preempting" when a notice arrives.

A marker is a callable taking the `Notice`; it may be sync or async. The W&B marker is
built in; the run client registers its own while a run is active.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from .notice import Notice

log = logging.getLogger("preemptwatch.marks")

Marker = Callable[[Notice], "Awaitable[Any] | Any"]

_lock = threading.Lock()
_markers: list[Marker] = []


def register_marker(marker: Marker) -> None:
    """Call ``marker(notice)`` on every watcher's first notice (once per marker)."""
    with _lock:
        if marker not in _markers:
            _markers.append(marker)


def unregister_marker(marker: Marker) -> None:
    """Stop calling ``marker``; unknown markers are ignored."""
    with _lock:
        if marker in _markers:
            _markers.remove(marker)


def markers() -> list[Marker]:
    """The markers to call, built-in W&B marker first."""
    with _lock:
        return [mark_wandb_run, *_markers]


def _wandb_run() -> Any:
    """The active W&B run, if wandb is imported (we never import it) and a run is set."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def mark_wandb_run(notice: Notice) -> bool:
    """``wandb.run.mark_preempting()`` when wandb is imported and a run is active.

    Works in offline mode too: the run's ``.wandb`` file then holds a ``preempting``
    record, which ``wandb sync`` uploads later. Returns whether a run was marked.
    """
    run = _wandb_run()
    if run is None:
        return False
    run.mark_preempting()
    log.info("marked W&B run %s preempting (%s)", getattr(run, "id", "?"), notice)
    return True


async def mark_all(notice: Notice, executor: Executor | None = None) -> None:
    """Call every marker; sync ones in a worker thread (of ``executor``, else the loop's
    default one). Errors are logged, never raised.

    The W&B marker is skipped without a thread when there is no W&B run, so a notice
    does not start a thread that would compete with the user's callbacks for the GIL.
    """

    async def call(marker: Marker) -> None:
        try:
            if inspect.iscoroutinefunction(marker):
                await marker(notice)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(executor, marker, notice)
                if inspect.isawaitable(result):
                    await result
        except Exception:
            log.exception("marker %r failed for %s", marker, notice)

    todo = [m for m in markers() if m is not mark_wandb_run or _wandb_run() is not None]
    if todo:
        await asyncio.gather(*(call(m) for m in todo))
