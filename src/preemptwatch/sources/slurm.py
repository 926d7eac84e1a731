"""The SLURM source: the job's ``--signal`` warning and SIGTERM become notices.

- The warning signal (default SIGUSR1; ``warning_signal=`` or ``PREEMPTWATCH_SLURM_SIGNAL``)
  is the time-limit warning of ``sbatch --signal=SIG@T``: kind ``time-limit``, deadline
  the job's end time.
- SIGTERM is a preemption (kind ``preempt``, deadline now + the partition's
  ``GraceTime``, else ``KillWait``), or the time limit itself when it comes at the job's
  end time (kind ``time-limit``, deadline now + ``KillWait``). The SIGTERM that follows
  this process's own ``scontrol requeue`` (`preemptwatch.slurm.requeue`) is ignored.

The handlers only build the notice from values read beforehand (end time, grace time,
``KillWait``: read once when the source starts, the end time refreshed every minute) and
hand it over; they do no I/O.

**Alongside the generic signal source.** Inside a job `start_watcher()` starts both the
``signal`` and the ``slurm`` source, in that order. Each signal still has one handler:
this source installs its handler last, on top, and chains to the one it replaced (the
signal source's, which chains to the script's own). So the SLURM notice, with its kind
and deadline, is reported first and is the one that counts; the generic ``signal``
notice that follows is recorded in ``watcher.notices`` only. ``preemptwatch run`` starts
the ``slurm`` source alone inside a job and the ``signal`` source alone outside.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from .. import slurm
from ..notice import Notice, utcnow
from .base import Source, SourceContext
from .signals import parse_signal

log = logging.getLogger("preemptwatch.sources.slurm")

#: Environment variable naming the ``--signal`` warning signal (default SIGUSR1).
SIGNAL_ENV = "PREEMPTWATCH_SLURM_SIGNAL"
#: Seconds of slack around the end time when telling a time-limit SIGTERM apart.
_END_SLACK = 5.0


class SlurmSource(Source):
    """Notices from the signals SLURM sends a job (see the module docstring)."""

    name = "slurm"

    def __init__(
        self,
        warning_signal: str | int | signal.Signals | None = None,
        *,
        refresh: float = 60.0,
        query_timeout: float = 10.0,
    ) -> None:
        chosen = warning_signal or os.environ.get(SIGNAL_ENV) or "SIGUSR1"
        #: The ``--signal`` warning signal.
        self.warning_signal = parse_signal(chosen)
        if self.warning_signal == signal.SIGTERM:
            raise ValueError("the warning signal cannot be SIGTERM (SLURM's final signal)")
        if refresh <= 0:
            raise ValueError("refresh must be a positive number of seconds")
        self.refresh = refresh
        self.query_timeout = query_timeout
        self.job_id = slurm.job_id()
        self.restarts = slurm.restart_count()
        #: The job's end time (UTC), once read.
        self.end_time: datetime | None = None
        #: Seconds from the preemption SIGTERM to the end of the grace time.
        self.grace_time: float | None = None
        #: Seconds from SIGTERM to SIGKILL.
        self.kill_wait: float = slurm.DEFAULT_KILL_WAIT
        self.previous: dict[signal.Signals, Any] = {}
        self._report: Callable[[Notice], None] | None = None
        self._active = False

    @classmethod
    async def detect(cls, session: Any) -> bool:
        """True inside a SLURM job."""
        return slurm.in_job()

    # ---------------------------------------------------------------- handlers

    def prepare(self, report: Callable[[Notice], None]) -> None:
        """Install the handlers (main thread only), chaining to the previous ones."""
        if self._active:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemptwatch: SLURM signals not watched: not on the main thread")
            return
        self._report = report
        self._active = True
        for sig in (self.warning_signal, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if previous is None:
                log.warning("%s has a handler installed outside Python; leaving it", sig.name)
                continue
            self.previous[sig] = previous
            signal.signal(sig, self._handle)

    def close(self) -> None:
        """Stop reporting; restore the previous handlers (from the main thread)."""
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in list(self.previous.items()):
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous)
                del self.previous[sig]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        notice = self.notice_for(sig) if self._active else None
        if notice is not None and self._report is not None:
            self._report(notice)
        previous = self.previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif not self._active and previous is signal.SIG_DFL:
            signal.signal(sig, previous)
            signal.raise_signal(sig)

    def notice_for(self, sig: signal.Signals, now: datetime | None = None) -> Notice | None:
        """The notice a delivery of ``sig`` means now, or None (our own requeue's echo)."""
        now = now or utcnow()
        raw: dict[str, Any] = {"signal": sig.name, "job_id": self.job_id, "restarts": self.restarts}
        if sig == self.warning_signal:
            return Notice(
                "slurm",
                "time-limit",
                deadline=self.end_time,
                detected_at=now,
                raw={**raw, "reason": "time limit warning"},
                id=f"warning-{self.job_id}-{self.restarts}",
            )
        if slurm.self_requeued_recently():
            return None
        end = self.end_time
        if end is not None and now >= end - timedelta(seconds=_END_SLACK):
            kind, seconds, reason = "time-limit", self.kill_wait, "time limit reached"
        else:
            kind, reason = "preempt", "preempted or cancelled"
            seconds = self.grace_time if self.grace_time else self.kill_wait
        return Notice(
            "slurm",
            kind,
            deadline=now + timedelta(seconds=seconds),
            detected_at=now,
            raw={**raw, "reason": reason},
            id=f"term-{self.job_id}-{self.restarts}",
        )

    # ------------------------------------------------------------------ loop

    def read_job(self) -> None:
        """Read the end time, grace time and ``KillWait`` (blocking; runs off the loop)."""
        self.kill_wait = slurm.kill_wait(self.query_timeout)
        self.grace_time = slurm.grace_time(timeout=self.query_timeout)
        self.refresh_end_time()

    def refresh_end_time(self) -> None:
        """Re-read the end time (``scontrol update`` may change the time limit)."""
        if self.job_id is not None:
            end = slurm.end_time(self.job_id, self.query_timeout)
            if end is not None or self.end_time is None:
                self.end_time = end

    async def run(self, ctx: SourceContext) -> None:
        """Read the job's times, then refresh the end time every ``refresh`` seconds."""
        await asyncio.to_thread(self.read_job)
        log.debug(
            "SLURM job %s: end %s, grace %s s, KillWait %s s",
            self.job_id,
            self.end_time,
            self.grace_time,
            self.kill_wait,
        )
        while True:
            await asyncio.sleep(self.refresh)
            await asyncio.to_thread(self.refresh_end_time)
