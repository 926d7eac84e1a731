"""The signal source: SIGTERM, SIGUSR1 and SIGUSR2 (by default) become a notice.

Kubernetes, systemd shutdowns on a preempted VM, SLURM and many batch systems warn a
process with a signal. The handler only records the notice: it builds a `Notice` and hands
it to the watcher without I/O and without taking any lock (the watcher appends to a deque
and wakes its loop through the loop's self-pipe, as asyncio itself does for signals), so
it is safe whatever the interrupted code was doing.

What happens to the previous disposition of each signal:

- a Python handler is **chained**: called after the notice is recorded;
- ``SIG_DFL`` is **not** applied while the watcher runs: SIGTERM no longer kills the
  process at once, so the script can checkpoint (check ``watcher.preempting`` or use a
  callback, then exit; the platform's SIGKILL still comes after its grace period);
- ``SIG_IGN`` **stays ignored but is recorded**: the process does not die or change
  course, yet the watcher learns that the machine is going away;
- a handler installed from C (``signal.getsignal`` gives ``None``) cannot be chained or
  restored, so that signal is left alone (with a warning).

Handlers can only be installed and restored from the main thread. Off the main thread
`prepare` logs a warning and does nothing. ``close()`` off the main thread cannot restore
them either: the handlers then turn inert, passing each signal on exactly as the previous
disposition would have (restoring it on the first delivery).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from ..notice import Notice
from .base import Source, SourceContext

log = logging.getLogger("preemptwatch.sources.signal")

#: The signals watched unless told otherwise.
DEFAULT_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2")
#: Environment variable naming the signals to watch, e.g. ``SIGTERM,SIGUSR2``.
SIGNALS_ENV = "PREEMPTWATCH_SIGNALS"

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def parse_signal(value: str | int | signal.Signals) -> signal.Signals:
    """``"SIGTERM"``, ``"term"``, ``15`` or ``signal.SIGTERM`` -> ``signal.SIGTERM``.

    Raises ``ValueError`` for names or numbers this platform does not have, and for
    SIGKILL and SIGSTOP, which cannot be caught.
    """
    try:
        if isinstance(value, signal.Signals):
            sig = value
        elif isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            sig = signal.Signals(int(value))
        else:
            name = str(value).strip().upper()
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {value!r}") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{sig.name} cannot be caught")
    return sig


def signals_from_env() -> tuple[signal.Signals, ...] | None:
    """The signals named in ``PREEMPTWATCH_SIGNALS``, or None when it is unset or empty."""
    raw = os.environ.get(SIGNALS_ENV, "").strip()
    if not raw:
        return None
    return tuple(parse_signal(part) for part in raw.split(",") if part.strip())


class SignalSource(Source):
    """Turns the given signals into notices of kind ``signal``.

    ``signals`` are names or numbers (default: ``PREEMPTWATCH_SIGNALS``, else SIGTERM,
    SIGUSR1 and SIGUSR2). Bad names raise ``ValueError`` here, before anything is
    installed.
    """

    name = "signal"

    def __init__(self, signals: Iterable[str | int | signal.Signals] | None = None) -> None:
        if signals is None:
            chosen = signals_from_env() or tuple(parse_signal(s) for s in DEFAULT_SIGNALS)
        else:
            chosen = tuple(parse_signal(s) for s in signals)
        if not chosen:
            raise ValueError("no signals to watch")
        #: The signals this source watches, in order, without repeats.
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(chosen))
        #: Previous disposition of each signal it installed a handler for.
        self.previous: dict[signal.Signals, _Handler] = {}
        #: Errors raised while recording a notice in the handler (kept, logged on close).
        self.errors: list[Exception] = []
        self._report: Callable[[Notice], None] | None = None
        self._active = False

    @property
    def installed(self) -> bool:
        """Whether this source's handlers are installed and recording."""
        return self._active

    def prepare(self, report: Callable[[Notice], None]) -> None:
        """Install the handlers (main thread only; elsewhere warn and do nothing)."""
        if self._active:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "preemptwatch: not watching %s: signal handlers can only be installed from "
                "the main thread (call start_watcher() there)",
                ", ".join(s.name for s in self.signals),
            )
            return
        self._report = report
        self._active = True
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous == self._handle:  # still ours, left inert by an earlier close()
                continue  # self.previous[sig] still holds what it replaced
            if previous is None:
                log.warning(
                    "preemptwatch: %s has a handler installed outside Python; leaving it alone",
                    sig.name,
                )
                continue
            if previous is signal.SIG_IGN:
                log.info("%s is ignored by this process; it stays ignored but now counts", sig.name)
            self.previous[sig] = previous
            signal.signal(sig, self._handle)
        log.debug("watching signals %s", ", ".join(s.name for s in self.previous))

    def close(self) -> None:
        """Stop recording and restore the previous handlers where possible."""
        self._active = False
        for exc in self.errors:
            log.error("preemptwatch: a signal could not be recorded: %r", exc)
        self.errors.clear()
        if threading.current_thread() is not threading.main_thread():
            if self.previous:
                log.info(
                    "signal handlers left in place, inert, until the next delivery "
                    "(they can only be restored from the main thread)"
                )
            return
        for sig, previous in list(self.previous.items()):
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous)
                del self.previous[sig]
            # else someone installed a handler over ours: keep theirs; ours stays inert
            # and keeps passing the signal on to what it replaced.

    async def run(self, ctx: SourceContext) -> None:
        """Nothing to poll: the handlers report. Idles until cancelled."""
        await asyncio.get_running_loop().create_future()

    # ----------------------------------------------------------------- the handler

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Record the notice, then pass the signal on to the previous handler.

        Runs between two bytecodes of the main thread: it must not do I/O or take a
        lock that the interrupted code may hold.
        """
        sig = signal.Signals(signum)
        report = self._report
        if self._active and report is not None:
            try:
                report(Notice("signal", "signal", raw={"signal": sig.name}))
            except Exception as exc:  # never into the interrupted training code
                self.errors.append(exc)  # logged by close(): no I/O here
            previous = self.previous.get(sig)
            if callable(previous):
                previous(signum, frame)
            return
        self._pass_on(sig, frame)

    def _pass_on(self, sig: signal.Signals, frame: FrameType | None) -> None:
        """Inert handler: behave exactly as the previous disposition would."""
        previous = self.previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(int(sig), frame)
            return
        if signal.getsignal(sig) == self._handle:
            signal.signal(sig, previous)  # runs on the main thread: allowed here
            self.previous.pop(sig, None)
        if previous is signal.SIG_DFL:
            signal.raise_signal(sig)  # delivered with the default action
