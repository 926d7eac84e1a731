"""preemptwatch: notice preemption in time to checkpoint, mark the run, requeue it.

``import preemptwatch`` is cheap: everything beyond `Notice` loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .notice import Notice

__version__ = "0.1.0"

#: Public name -> module that defines it (loaded lazily, to keep import time low).
_LAZY: dict[str, str] = {
    "Watcher": "preemptwatch.watcher",
    "start_watcher": "preemptwatch.start",
    "current_watcher": "preemptwatch.start",
    "register_marker": "preemptwatch.marks",
    "unregister_marker": "preemptwatch.marks",
    "init": "preemptwatch.client.run",
    "Run": "preemptwatch.client.run",
    "mark_preempting": "preemptwatch.client.run",
}

if TYPE_CHECKING:
    from .client.run import Run, init, mark_preempting
    from .marks import register_marker, unregister_marker
    from .start import current_watcher, start_watcher
    from .watcher import Watcher


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'preemptwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Notice",
    "Run",
    "Watcher",
    "__version__",
    "current_watcher",
    "init",
    "mark_preempting",
    "register_marker",
    "start_watcher",
    "unregister_marker",
]
