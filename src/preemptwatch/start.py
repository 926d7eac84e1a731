"""`start_watcher()`: the one line a training script adds."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .notice import SOURCE_NAMES
from .watcher import Callback, Watcher

log = logging.getLogger("preemptwatch")

_lock = threading.Lock()
_current: Watcher | None = None


def current_watcher() -> Watcher | None:
    """The watcher started by :func:`start_watcher`, if it is running."""
    return _current if _current is not None and _current.running else None


def start_watcher(
    callbacks: Callback | Iterable[Callback] = (),
    *,
    sources: Sequence[str] | None = None,
    poll_interval: float | None = None,
    source_options: Mapping[str, Mapping[str, Any]] | None = None,
    count_rebalance: bool = False,
    maintenance_lead: float = 600.0,
    mark: bool = True,
    on_advisory: Callback | None = None,
) -> Watcher:
    """Start watching for preemption in a background thread and return the `Watcher`.

    ``callbacks`` (one or several, sync or async) get the first `Notice` that counts.
    ``sources`` names the sources to run (default: ``PREEMPTWATCH_SOURCES``, else the
    signal source, SLURM inside a job, the sidecar when ``PREEMPTWATCH_SIDECAR_URL`` is
    set, and whichever cloud metadata service answers). Calling it again returns the
    running watcher, with any new callbacks added. It never raises because of the
    environment: problems are logged and the watcher runs with what works.
    """
    global _current
    new_callbacks = [callbacks] if callable(callbacks) else list(callbacks)
    with _lock:
        if _current is not None and _current.running:
            for cb in new_callbacks:
                if cb not in _current.callbacks:
                    _current.add_callback(cb)
            return _current
        names, detect = _choose_sources(sources)
        built = []
        for name in names:
            options = dict((source_options or {}).get(name, {}))
            if poll_interval is not None and name in ("ec2", "gcp", "azure", "sidecar"):
                options.setdefault("interval", poll_interval)
            try:
                from .sources import make_source

                built.append(make_source(name, **options))
            except Exception as exc:
                log.error("preemptwatch: cannot start source %s: %s", name, exc)
        watcher = Watcher(
            built,
            new_callbacks,
            detect=detect,
            count_rebalance=count_rebalance,
            maintenance_lead=maintenance_lead,
            mark=mark,
            on_advisory=on_advisory,
        )
        try:
            watcher.start_in_thread()
        except Exception as exc:
            log.error("preemptwatch: watcher could not start: %s", exc)
        _current = watcher
        log.info(
            "preemptwatch: watching %s",
            ", ".join([s.name for s in built] + [f"{d}?" for d in detect]) or "nothing",
        )
        return watcher


def _choose_sources(sources: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(sources to start, cloud sources to probe first)."""
    if sources is None:
        env = os.environ.get("PREEMPTWATCH_SOURCES", "").strip()
        if env:
            sources = [s.strip() for s in env.split(",") if s.strip()]
    if sources is not None:
        known = [s for s in sources if s in SOURCE_NAMES]
        for unknown in set(sources) - set(known):
            log.error(
                "preemptwatch: ignoring unknown source %r (known: %s)",
                unknown,
                ", ".join(SOURCE_NAMES),
            )
        return list(dict.fromkeys(known)), []
    names: list[str] = []
    if threading.current_thread() is threading.main_thread():
        names.append("signal")
    if os.environ.get("SLURM_JOB_ID"):
        names.append("slurm")
    if os.environ.get("PREEMPTWATCH_SIDECAR_URL"):
        names.append("sidecar")
        return names, []
    return names, ["ec2", "gcp", "azure"]
