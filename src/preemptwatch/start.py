"""`start_watcher()`: the one line a training script adds."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .notice import SOURCE_NAMES
from .watcher import Callback, Watcher

if TYPE_CHECKING:
    from .sources.base import Source

log = logging.getLogger("preemptwatch")

#: Cloud sources probed when no source is named (kept here so importing this module
#: does not import the sources package).
CLOUD_SOURCES = ("ec2", "gcp", "azure")
#: Sources that take ``interval=``.
_POLLING = ("ec2", "gcp", "azure", "sidecar")

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
    set, and whichever cloud metadata service answers a short probe). Returns at once:
    probing goes on in the background. Calling it again returns the running watcher,
    with any new callbacks added.

    It never raises because of the environment (a bad ``PREEMPTWATCH_SOURCES``, an
    unreachable metadata service, not being on a cloud at all): problems are logged and
    the watcher runs with what works. Mistakes in the arguments themselves (an unknown
    name in ``sources``, a poll interval that is not positive) raise ``ValueError``.
    """
    global _current
    new_callbacks = [callbacks] if callable(callbacks) else list(callbacks)
    if sources is not None:
        if isinstance(sources, str):
            sources = [s.strip() for s in sources.split(",") if s.strip()]
        unknown = [s for s in sources if s not in SOURCE_NAMES]
        if unknown:
            raise ValueError(
                f"unknown source(s) {', '.join(map(repr, unknown))}; "
                f"known sources: {', '.join(SOURCE_NAMES)}"
            )
    if poll_interval is not None and not poll_interval > 0:
        raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval}")
    with _lock:
        if _current is not None and _current.running:
            for cb in new_callbacks:
                if cb not in _current.callbacks:
                    _current.add_callback(cb)
            return _current
        names, detect = _choose_sources(sources)
        options = _source_options(names + detect, poll_interval, source_options)
        built: list[Source] = []
        for name in names:
            try:
                from .sources import make_source

                built.append(make_source(name, **options.get(name, {})))
            except Exception as exc:
                log.error("preemptwatch: cannot start source %s: %s", name, exc)
        watcher = Watcher(
            built,
            new_callbacks,
            detect=detect,
            detect_options=options,
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


def _source_options(
    names: Sequence[str],
    poll_interval: float | None,
    given: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """Constructor keyword arguments per source name."""
    options: dict[str, dict[str, Any]] = {}
    for name in names:
        opts = dict((given or {}).get(name, {}))
        if poll_interval is not None and name in _POLLING:
            opts.setdefault("interval", poll_interval)
        options[name] = opts
    return options


def _choose_sources(sources: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(sources to start, cloud sources to probe first)."""
    if sources is None:
        env = os.environ.get("PREEMPTWATCH_SOURCES", "").strip()
        if env:
            named = [s.strip().lower() for s in env.split(",") if s.strip()]
            known = [s for s in named if s in SOURCE_NAMES]
            for unknown in dict.fromkeys(s for s in named if s not in SOURCE_NAMES):
                log.error(
                    "preemptwatch: PREEMPTWATCH_SOURCES names unknown source %r; ignoring it "
                    "(known: %s)",
                    unknown,
                    ", ".join(SOURCE_NAMES),
                )
            if known:
                return list(dict.fromkeys(known)), []
            log.error("preemptwatch: no usable source in PREEMPTWATCH_SOURCES; choosing them")
    if sources is not None:
        return list(dict.fromkeys(sources)), []
    names = ["signal"]
    if os.environ.get("SLURM_JOB_ID"):
        names.append("slurm")
    if os.environ.get("PREEMPTWATCH_SIDECAR_URL"):
        names.append("sidecar")
        return names, []
    return names, list(CLOUD_SOURCES)
