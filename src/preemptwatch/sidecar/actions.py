"""Local actions on a notice: signal processes, run a hook."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..notice import Notice

log = logging.getLogger("preemptwatch.sidecar")


def parse_signal(value: str | int) -> signal.Signals:
    """``"TERM"``, ``"SIGTERM"``, ``"15"`` or ``15`` -> ``signal.SIGTERM``;
    ``ValueError`` for anything else."""
    text = str(value).strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ValueError(f"unknown signal {value!r} (use a name such as TERM or USR1)") from None


@dataclass
class SignalTargets:
    """Whom to signal: PIDs, PIDs read from files at notice time, process groups."""

    sig: signal.Signals = signal.SIGTERM
    pids: Sequence[int] = ()
    pid_files: Sequence[Path] = ()
    pgids: Sequence[int] = ()

    def __post_init__(self) -> None:
        for number in [*self.pids, *self.pgids]:
            if number <= 1:
                raise ValueError(f"refusing to signal PID/PGID {number}: it must be above 1")

    def __bool__(self) -> bool:
        return bool(self.pids or self.pid_files or self.pgids)

    def resolve_pids(self) -> list[int]:
        """The PIDs to signal: given ones plus each PID file's first line (unreadable or
        malformed files are logged and skipped)."""
        pids = list(self.pids)
        for path in self.pid_files:
            try:
                text = Path(path).read_text().split()
                pid = int(text[0])
            except (OSError, ValueError, IndexError) as exc:
                log.error("cannot read a PID from %s: %s", path, exc)
                continue
            if pid <= 1:
                log.error("PID file %s holds %d; not signalling it", path, pid)
                continue
            pids.append(pid)
        return list(dict.fromkeys(pids))

    def send(self) -> tuple[int, int]:
        """Signal every target; returns (delivered, failed). Never raises."""
        delivered = failed = 0
        for pid in self.resolve_pids():
            try:
                os.kill(pid, self.sig)
                delivered += 1
                log.warning("sent %s to PID %d", self.sig.name, pid)
            except OSError as exc:
                failed += 1
                log.error("cannot send %s to PID %d: %s", self.sig.name, pid, exc)
        for pgid in self.pgids:
            try:
                os.killpg(pgid, self.sig)
                delivered += 1
                log.warning("sent %s to process group %d", self.sig.name, pgid)
            except OSError as exc:
                failed += 1
                log.error("cannot send %s to process group %d: %s", self.sig.name, pgid, exc)
        return delivered, failed


def notice_environment(notice: Notice, instance_id: str | None) -> dict[str, str]:
    """The variables a hook gets: ``PREEMPTWATCH_NOTICE`` (the notice as JSON) and flat
    ``PREEMPTWATCH_NOTICE_{SOURCE,KIND,ID,DEADLINE,SECONDS_LEFT}``,
    ``PREEMPTWATCH_INSTANCE_ID``."""
    left = notice.seconds_left()
    return {
        "PREEMPTWATCH_NOTICE": json.dumps(notice.to_dict(), default=str),
        "PREEMPTWATCH_NOTICE_SOURCE": notice.source,
        "PREEMPTWATCH_NOTICE_KIND": notice.kind,
        "PREEMPTWATCH_NOTICE_ID": notice.id,
        "PREEMPTWATCH_NOTICE_DEADLINE": notice.deadline.isoformat() if notice.deadline else "",
        "PREEMPTWATCH_NOTICE_SECONDS_LEFT": "" if left is None else f"{left:.0f}",
        "PREEMPTWATCH_INSTANCE_ID": instance_id or "",
    }


@dataclass
class ExecHook:
    """Runs ``argv`` once with the notice in its environment, bounded by ``timeout`` and
    by the notice's deadline (killed when either passes)."""

    argv: Sequence[str]
    timeout: float = 60.0
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("the exec hook needs a command")

    async def run(self, notice: Notice, instance_id: str | None) -> int | None:
        """The hook's exit code, or None if it could not start or was killed."""
        env = {**os.environ, **self.env, **notice_environment(notice, instance_id)}
        left = notice.seconds_left()
        limit = self.timeout if left is None else min(self.timeout, left)
        try:
            proc = await asyncio.create_subprocess_exec(*self.argv, env=env)
        except OSError as exc:
            log.error("exec hook %s could not start: %s", self.argv[0], exc)
            return None
        try:
            code = await asyncio.wait_for(proc.wait(), limit)
        except asyncio.TimeoutError:
            log.error("exec hook %s still running after %.0fs; killing it", self.argv[0], limit)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        (log.info if code == 0 else log.error)("exec hook %s exited %d", self.argv[0], code)
        return code
