"""The supervising wrapper behind ``preemptwatch run -- CMD``.

It runs CMD as a child in its own process group, watches for notices itself (the
``slurm`` source inside a SLURM job, the ``signal`` source elsewhere), forwards signals
to the child, and when the child exits reports its exit code to the run server (when
one is configured) and exits with the same code.

Inside a SLURM job it also

- gives the child a run ID that survives requeues (``PREEMPTWATCH_RUN_ID`` from the
  cluster name and the array-aware job ID, with ``PREEMPTWATCH_RESUME=allow``);
- after a time-limit warning, requeues the job (``scontrol requeue``) once the child has
  exited non-zero, or shortly before the time limit if it has not;
- after a preemption, requeues the job itself if the child exited before the grace time
  ended (SLURM 22.05 otherwise records such a job as failed and never requeues it), and
  ignores the SIGTERM its own requeue causes;
- warns when it runs where the job's ``--signal`` warning cannot reach it.

In a step of several tasks (``srun -n 4 preemptwatch run ...``) only task 0
(``SLURM_PROCID=0``) reports to the server and requeues; every task supervises its own
command.

Signal handlers only record the signal and wake the main loop through a pipe; all the
work (forwarding, requeueing, HTTP) happens in the main loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import string
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from . import slurm
from .notice import Notice, utcnow

log = logging.getLogger("preemptwatch.run")

#: Signals passed on to the child (besides the warning signal).
FORWARDED: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


@dataclass
class WrapperConfig:
    """What ``preemptwatch run`` was asked to do."""

    command: Sequence[str]
    #: The ``--signal`` warning signal of the SLURM job.
    warning_signal: signal.Signals = signal.SIGUSR1
    #: What the child gets for a notice signal (the warning or SIGTERM); None: the same one.
    forward_signal: signal.Signals | None = None
    #: Pass signals on to the child at all.
    forward: bool = True
    #: Requeue the SLURM job after a time-limit warning or an early exit after preemption.
    requeue: bool = True
    requeue_timeout: float = 30.0
    #: Requeue this long before the time limit if the child is still running.
    requeue_margin: float = 10.0
    server: str | None = None
    api_key: str | None = None
    project: str | None = None
    run_id: str | None = None
    #: Source names for the wrapper's watcher; default ``slurm`` in a job, else ``signal``.
    sources: Sequence[str] | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(
                "no command to run: give it after `--`, as in `run -- python train.py`"
            )
        if self.requeue_timeout <= 0 or self.requeue_margin < 0:
            raise ValueError("requeue timeout must be positive and the margin not negative")


def exit_code_of(returncode: int) -> int:
    """A child's return code as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class RunReporter:
    """Tells the run server about the wrapped run: preempting marks and the exit code.

    The command normally creates or resumes the run itself (``preemptwatch.init()``). When
    it does not (a script that knows nothing of preemptwatch), the reporter resumes the run
    for this attempt itself (``resume=allow``), so marks and exit codes are never lost.
    Never raises: a server that cannot be reached is logged, training goes on.
    """

    def __init__(
        self, server: str | None, api_key: str | None, run_id: str, meta: dict[str, Any]
    ) -> None:
        from .client.api import ApiClient

        self.client = ApiClient(server, api_key, timeout=5.0, retry_budget=8.0)
        self.run_id = run_id
        self.meta = meta
        #: The run's incarnation before the command started (0: no such run; None: unknown).
        self.start_incarnation: int | None = None

    def snapshot(self) -> None:
        """Note the run's incarnation before the command starts (one quick try)."""
        from urllib.parse import quote

        from .errors import ApiNotFound

        try:
            run = self.client.request(
                "GET", f"/api/v1/runs/{quote(self.run_id, safe='')}", budget=2.0
            )
            self.start_incarnation = int(run["incarnation"])
        except ApiNotFound:
            self.start_incarnation = 0
        except Exception as exc:
            log.warning("run server not reachable at start (%s); reporting at exit anyway", exc)

    def _current(self) -> dict[str, Any] | None:
        from .errors import ApiNotFound

        try:
            return self.client.get_run(self.run_id)
        except ApiNotFound:
            return None

    def _this_attempt(self) -> dict[str, Any]:
        """The run as this attempt sees it: the command's incarnation if it made one,
        else one resumed here."""
        run = self._current()
        untouched = run is not None and (
            run["state"] != "running" and run["incarnation"] == self.start_incarnation
        )
        if run is None or untouched:
            run = self.client.create_run(
                id=self.run_id, resume="allow", host=socket.gethostname(), meta=self.meta
            )
        return run

    def mark(self, notice: Notice) -> None:
        """Mark this attempt's run preempting (resuming it first if nobody did)."""
        try:
            run = self._this_attempt()
            if run["state"] == "running" and not run.get("preempting"):
                self.client.mark_preempting(self.run_id, run["incarnation"], notice)
                log.warning("marked run %s preempting", self.run_id)
        except Exception as exc:
            log.error("could not mark run %s preempting (will retry at exit): %s", self.run_id, exc)

    def finish(self, exit_code: int, notice: Notice | None) -> dict[str, Any] | None:
        """Record how the attempt ended: mark the run first if there was a notice and
        the exit code is not 0, then finish it (unless the command finished it already)."""
        try:
            run = self._this_attempt()
            if run["state"] != "running":
                log.info("run %s already ended as %s", self.run_id, run["state"])
                return run
            if notice is not None and exit_code != 0 and not run.get("preempting"):
                self.client.mark_preempting(self.run_id, run["incarnation"], notice)
            ended = self.client.finish(self.run_id, run["incarnation"], exit_code)
            log.warning("run %s ended: %s (exit code %d)", self.run_id, ended["state"], exit_code)
            return ended
        except Exception as exc:
            log.error("could not report the exit of run %s: %s", self.run_id, exc)
            return None
        finally:
            self.client.close()


class Wrapper:
    """Runs one child under supervision; :meth:`run` returns its exit code."""

    def __init__(self, config: WrapperConfig) -> None:
        self.config = config
        self.env = dict(config.env)
        self.in_job = slurm.in_job(self.env)
        #: Rank 0 of a multi-task step (or the only task) reports and requeues; the
        #: other tasks only supervise their command.
        self.leader = self.env.get("SLURM_PROCID", "0") == "0"
        self.child: subprocess.Popen[bytes] | None = None
        #: The first notice that counted, once the watcher has one.
        self.notice: Notice | None = None
        #: Whether this wrapper requeued its job.
        self.requeued = False
        #: Why the requeue failed, if it did.
        self.requeue_error: str | None = None
        self.run_id = self._choose_run_id()
        self.reporter: RunReporter | None = None
        self._pending: deque[int] = deque()
        self._rfd = self._wfd = -1
        self._previous: dict[signal.Signals, Any] = {}
        self._requeue_at: float | None = None
        self._notice_signals = 0

    # ------------------------------------------------------------ set-up

    def _server(self) -> str | None:
        return self.config.server or self.env.get("PREEMPTWATCH_SERVER") or None

    def _choose_run_id(self) -> str | None:
        from .client.settings import normalize_run_id

        given = self.config.run_id or self.env.get("PREEMPTWATCH_RUN_ID")
        if given:
            return normalize_run_id(given)
        if self.in_job:
            return slurm.run_id(self.env)
        return _new_run_id() if self._server() else None

    def child_env(self) -> dict[str, str]:
        """The child's environment: the run ID, ``resume=allow``, the server settings and
        (in a job) ``PREEMPTWATCH_SLURM_SIGNAL``, the signal it gets as the warning."""
        env = dict(self.env)
        if self.run_id:
            env["PREEMPTWATCH_RUN_ID"] = self.run_id
            env.setdefault("PREEMPTWATCH_RESUME", "allow")
        warning = self.config.forward_signal or self.config.warning_signal
        if self.in_job and warning != signal.SIGTERM:
            # What the command's own watcher should take as the time-limit warning.
            env.setdefault("PREEMPTWATCH_SLURM_SIGNAL", warning.name)
        for key, value in (
            ("PREEMPTWATCH_SERVER", self.config.server),
            ("PREEMPTWATCH_API_KEY", self.config.api_key),
            ("PREEMPTWATCH_PROJECT", self.config.project),
        ):
            if value:
                env[key] = value
        return env

    def meta(self) -> dict[str, Any]:
        """What the run records about where it ran (SLURM job, restart count)."""
        return slurm.job_meta(self.env) if self.in_job else {}

    def _install(self) -> None:
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        signals = set(FORWARDED) | {self.config.warning_signal, signal.SIGCHLD}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _uninstall(self) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Record the signal and wake the main loop: nothing else."""
        self._pending.append(signum)
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"\0")

    def _start_watcher(self) -> Any:
        from .sources import make_source
        from .watcher import Watcher

        names = list(self.config.sources or (["slurm"] if self.in_job else ["signal"]))
        sources = []
        for name in names:
            try:
                if name == "slurm":
                    sources.append(make_source(name, warning_signal=self.config.warning_signal))
                elif name == "signal":
                    signals = {signal.SIGTERM, self.config.warning_signal}
                    sources.append(make_source(name, signals=sorted(signals)))
                else:
                    sources.append(make_source(name))
            except Exception as exc:
                log.error("cannot start source %s: %s", name, exc)
        watcher = Watcher(sources, [self._noticed], mark=False)
        watcher.start_in_thread()
        return watcher

    def _noticed(self, notice: Notice) -> None:
        """Watcher callback (watcher thread): remember the notice, mark the run."""
        self.notice = notice
        with contextlib.suppress(OSError):
            os.write(self._wfd, b"\0")
        if self.reporter is not None:
            self.reporter.mark(notice)

    # -------------------------------------------------------------- running

    def run(self) -> int:
        """Start the child, supervise it, report, requeue if needed; its exit code."""
        if self.in_job:
            warning = slurm.signal_warning(self.config.warning_signal.name, self.env)
            if warning:
                log.warning("preemptwatch: %s", warning)
        if self._server() and self.run_id and self.leader:
            try:
                self.reporter = RunReporter(
                    self._server(), self.config.api_key, self.run_id, self.meta()
                )
            except Exception as exc:
                log.error("not reporting to the run server: %s", exc)
        if self.reporter is not None:
            self.reporter.snapshot()
        self._install()
        watcher = None
        try:
            watcher = self._start_watcher()
            code = self._supervise()
            if self._notice_signals and watcher.wait(2.0):
                # The child may exit before the watcher has taken the signal in.
                self.notice = self.notice or watcher.notice
                watcher.wait_handled(5.0)  # let the mark reach the server first
            return self._after_exit(code)
        finally:
            if watcher is not None:
                watcher.stop()
            self._uninstall()

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        group: dict[str, Any] = (
            {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        )
        try:
            return subprocess.Popen(list(self.config.command), env=self.child_env(), **group)
        except OSError as exc:
            log.error("preemptwatch: cannot run %s: %s", self.config.command[0], exc)
            return None

    def _supervise(self) -> int:
        child = self._spawn()
        if child is None:
            return 127
        self.child = child
        log.info(
            "started %s (pid %d, run %s)", " ".join(self.config.command), child.pid, self.run_id
        )
        while True:
            returncode = child.poll()
            if returncode is not None:
                return exit_code_of(returncode)
            timeout = 0.5
            if self._requeue_at is not None:
                timeout = max(0.0, min(timeout, self._requeue_at - time.monotonic()))
            with contextlib.suppress(InterruptedError):
                ready, _, _ = select.select([self._rfd], [], [], timeout)
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._rfd, 4096)
            while self._pending:
                self._handle_signal(signal.Signals(self._pending.popleft()))
            self._check_deadline()

    def _handle_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGCHLD:
            return
        if sig == signal.SIGTERM and slurm.self_requeued_recently():
            log.info("ignoring the SIGTERM of our own requeue")
            return
        if sig in (signal.SIGTERM, self.config.warning_signal):
            self._notice_signals += 1
        if not self.config.forward or self.child is None:
            return
        target: signal.Signals = sig
        if self.config.forward_signal is not None and sig in (
            signal.SIGTERM,
            self.config.warning_signal,
        ):
            target = self.config.forward_signal
        log.info("received %s; sending %s to the child", sig.name, target.name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.child.pid, target)

    def _check_deadline(self) -> None:
        """After a time-limit warning: requeue shortly before the limit if still running."""
        notice = self.notice
        if (
            self._requeue_at is None
            and notice is not None
            and notice.kind == "time-limit"
            and self.in_job
            and self.leader
            and self.config.requeue
        ):
            # The source may not have read the end time yet when the warning came early.
            end = notice.deadline or slurm.end_time(slurm.job_id(self.env))
            if end is None:
                log.warning("the job's end time is unknown: requeueing only once CMD exits")
                self._requeue_at = float("inf")
                return
            left = (end - utcnow()).total_seconds() - self.config.requeue_margin
            self._requeue_at = time.monotonic() + max(0.0, left)
        if (
            self._requeue_at is not None
            and not self.requeued
            and self.requeue_error is None
            and time.monotonic() >= self._requeue_at
        ):
            log.warning("time limit near and the command still runs: requeueing the job now")
            if self.reporter is not None and notice is not None:
                self.reporter.mark(notice)
            self._requeue()
            if self.child is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.child.pid, signal.SIGTERM)

    def _after_exit(self, code: int) -> int:
        notice = self.notice
        log.info("command exited with %d%s", code, f" after {notice}" if notice else "")
        if self.reporter is not None:
            self.reporter.finish(code, notice)
        if notice is not None and code != 0 and self.in_job and self.leader and self.config.requeue:
            self._requeue_after(notice)
        return code

    def _requeue_after(self, notice: Notice) -> None:
        if self.requeued or self.requeue_error is not None:
            return
        if notice.kind == "time-limit":
            self._requeue()
            return
        job = slurm.show_job(slurm.job_id(self.env))
        if job is None:
            log.warning("cannot tell whether SLURM preempted this job; not requeueing it")
        elif slurm.already_requeued(job, slurm.restart_count(self.env)):
            log.info("SLURM has requeued the job already")
        elif not slurm.was_preempted(job):
            log.info("the job was stopped, not preempted (no PreemptTime): not requeueing it")
        elif not slurm.requeueable(job):
            self.requeue_error = (
                f"job {slurm.job_id(self.env)} was preempted but cannot be requeued: it was "
                "submitted with --no-requeue; submit it with `sbatch --requeue`"
            )
            log.error("preemptwatch: %s", self.requeue_error)
        else:
            self._requeue()  # exiting during GraceTime would lose the job on SLURM 22.05

    def _requeue(self) -> None:
        try:
            slurm.requeue(slurm.job_id(self.env), timeout=self.config.requeue_timeout)
        except slurm.RequeueError as exc:
            self.requeue_error = str(exc)
            log.error("preemptwatch: %s", exc)
            return
        self.requeued = True
