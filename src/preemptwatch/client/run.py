"""`init()` and `Run`: the run client a training script uses.

Nothing here blocks training for long or crashes it because the server is away: logs are
sent in order by a background task, the heartbeat runs on the client's daemon thread, a
mark that cannot reach the server in time is kept in the spool, and ``finish`` only warns.
What does raise: refused requests at ``init`` (the resume table), bad arguments, and
writes to a run that a newer process resumed (`RunFenced`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import platform, slurm
from ..errors import (
    ApiError,
    ApiStaleIncarnation,
    ApiUnavailable,
    ConfigError,
    RunFenced,
)
from ..marks import register_marker, unregister_marker
from ..notice import Notice
from . import autoresume, exithooks
from .api import ApiClient, _q
from .loop import client_loop, run_sync
from .settings import Settings, normalize_run_id
from .spool import deliver_spool, spool_mark

log = logging.getLogger("preemptwatch.client")

#: Seconds a mark without a deadline may take before it goes to the spool.
DEFAULT_MARK_BUDGET = 10.0
#: Seconds one request of the log sender is retried before it tries again (or, once the
#: run is finishing, gives the entry up).
LOG_BUDGET = 120.0
#: Log entries kept while the server is away; newer ones are dropped beyond this.
MAX_QUEUED_LOGS = 100_000
#: Seconds ``finish`` waits for queued logs.
FLUSH_TIMEOUT = 30.0

_active_lock = threading.RLock()  # re-entrant: the SIGTERM handler may finish
_active: Run | None = None


def active_run() -> Run | None:
    """The run started by `init` in this process and not finished yet."""
    return _active


class Run:
    """One run on the server, as seen by the process that writes to it.

    Made by `init`; use it as a context manager or call `finish`.
    """

    def __init__(
        self,
        api: ApiClient,
        record: Mapping[str, Any],
        *,
        root: Path | None = None,
        heartbeat_interval: float = 30.0,
    ) -> None:
        self.api = api
        #: The run ID (unique in the project).
        self.id: str = str(record["id"])
        self.project: str | None = record.get("project")
        #: True when this process resumed an existing run.
        self.resumed: bool = bool(record.get("resumed"))
        #: The last step logged (-1 when none): a script starts at ``run.step + 1``.
        self.step: int = int(record.get("step", -1))
        #: This process's incarnation of the run; every write carries it.
        self.incarnation: int = int(record["incarnation"])
        self.config: dict[str, Any] = dict(record.get("config") or {})
        self.instance_id: str | None = record.get("instance_id")
        self.host: str | None = record.get("host")
        self.sweep_id: str | None = record.get("sweep_id")
        #: The server's state of the run, as last seen.
        self.state: str = str(record.get("state", "running"))
        #: Whether the run is marked preempting (by us, or as the last heartbeat told).
        self.preempting: bool = bool(record.get("preempting"))
        #: True once a newer process resumed the run: this one may no longer write.
        self.fenced: bool = False
        self.finished: bool = False
        self.heartbeat_interval = heartbeat_interval
        self._root = root
        self._lock = threading.RLock()  # re-entrant: the SIGTERM handler may finish
        self._queue: asyncio.Queue[tuple[int, dict[str, Any]]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._dropped_logs = 0

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, incarnation={self.incarnation}, step={self.step})"

    @property
    def _path(self) -> str:
        return f"/api/v1/runs/{_q(self.id)}"

    # ------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        """Start the heartbeat and the log sender; make this the active run."""
        global _active

        async def start() -> None:
            self._queue = asyncio.Queue()
            self._sender = asyncio.ensure_future(self._send_logs())
            self._heartbeat = asyncio.ensure_future(self._beat())

        run_sync(start())
        register_marker(self._on_notice)
        with _active_lock:
            _active = self
        exithooks.install(_finish_active_at_exit)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            code = 0
        elif isinstance(exc, SystemExit):
            code = exithooks.exit_code_of(exc.code)
        elif isinstance(exc, KeyboardInterrupt):
            code = 130
        else:
            code = 1
        self.finish(code)

    def finish(self, exit_code: int = 0, *, timeout: float = 30.0) -> None:
        """End the run with ``exit_code``: 0 -> finished; non-zero -> preempted when it was
        marked preempting, else failed. Sends queued logs and spooled marks first. Never
        raises because of the server: problems are logged (the server's reaper settles a
        run whose finish never arrived)."""
        global _active
        if not isinstance(exit_code, int) or isinstance(exit_code, bool):
            raise TypeError(f"exit_code must be an int, not {exit_code!r}")
        with self._lock:
            if self.finished:
                return
            self.finished = True
        try:
            self._stop_background(flush=min(FLUSH_TIMEOUT, timeout))
            if self.fenced:
                log.warning("preemptwatch: run %s was resumed elsewhere; not finishing it", self.id)
                return
            if exit_code != 0:
                deliver_spool(self.api, run_id=self.id, budget=min(5.0, timeout))
            try:
                answer = self.api.finish(self.id, self.incarnation, exit_code, budget=timeout)
                self.state = str(answer.get("state", self.state))
                log.info(
                    "preemptwatch: run %s ended %s (exit code %d)", self.id, self.state, exit_code
                )
            except ApiStaleIncarnation:
                self._fence()
            except ApiError as exc:
                log.warning("preemptwatch: could not finish run %s: %s", self.id, exc)
        finally:
            unregister_marker(self._on_notice)
            self.api.close()
            with _active_lock:
                if _active is self:
                    _active = None
            if exit_code == 0:
                autoresume.clear_run(self.id, self._root)

    def _stop_background(self, flush: float) -> None:
        async def stop() -> None:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            if self._queue is not None and self._sender is not None:
                try:
                    await asyncio.wait_for(self._queue.join(), flush)
                except asyncio.TimeoutError:
                    left = self._queue.qsize() + 1
                    log.warning(
                        "preemptwatch: %d log entries of run %s not sent in %.0fs; dropped",
                        left,
                        self.id,
                        flush,
                    )
                self._sender.cancel()

        try:
            run_sync(stop(), timeout=flush + 5.0)
        except Exception as exc:
            log.warning("preemptwatch: could not stop run %s's background work: %r", self.id, exc)

    # ---------------------------------------------------------------- writes

    def _fenced_error(self) -> RunFenced:
        return RunFenced(
            f"run {self.id} was resumed by a newer process (this is incarnation "
            f"{self.incarnation}); this process may no longer write to it",
            status=409,
            code="stale_incarnation",
        )

    def _check_writable(self) -> None:
        if self.fenced:
            raise self._fenced_error()
        if self.finished:
            raise RuntimeError(f"run {self.id} is finished; start a new one with init()")

    def log(self, data: Mapping[str, Any], step: int | None = None) -> int:
        """Log ``data`` at ``step`` (default: the last step + 1); returns the step.

        Returns at once: entries are sent in order in the background. The step never goes
        backwards (ValueError); logging the last step again merges into it. Numpy and
        tensor values are converted; NaN and infinities are logged as the strings
        ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.
        """
        self._check_writable()
        try:
            payload = to_json(data)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"log() data must be JSON-serialisable: {exc}") from None
        with self._lock:
            if step is None:
                step = self.step + 1
            elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"step must be a non-negative int, not {step!r}")
            elif step < self.step:
                raise ValueError(
                    f"step {step} is below the last logged step {self.step}: steps never go "
                    "backwards"
                )
            self.step = step
            queue = self._queue
            assert queue is not None
            if queue.qsize() >= MAX_QUEUED_LOGS:
                self._dropped_logs += 1
                if self._dropped_logs == 1 or self._dropped_logs % 1000 == 0:
                    log.warning(
                        "preemptwatch: %d log entries of run %s waiting for the server; "
                        "dropping new ones (%d so far)",
                        MAX_QUEUED_LOGS,
                        self.id,
                        self._dropped_logs,
                    )
                return step
            client_loop().call_soon_threadsafe(queue.put_nowait, (step, payload))
        return step

    async def _send_logs(self) -> None:
        """Send queued entries in order. While the server is away an entry is retried
        until it lands (the queue holds the rest); once finishing, for `LOG_BUDGET`."""
        assert self._queue is not None
        queue = self._queue
        path = f"{self._path}/log"
        while True:
            step, data = await queue.get()
            body = {"incarnation": self.incarnation, "step": step, "data": data}
            try:
                while not self.fenced:
                    try:
                        await self.api.arequest("POST", path, json=body, budget=LOG_BUDGET)
                        break
                    except ApiUnavailable as exc:
                        if self.finished or exc.status is not None:
                            raise  # finishing, or the server keeps failing on this entry
                        log.warning("preemptwatch: logs of run %s wait: %s", self.id, exc)
            except ApiStaleIncarnation:
                self._fence()
            except ApiError as exc:
                self._dropped_logs += 1
                log.warning("preemptwatch: log of run %s at step %d lost: %s", self.id, step, exc)
            except Exception:
                log.exception("preemptwatch: log of run %s at step %d lost", self.id, step)
            finally:
                queue.task_done()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait until every queued log entry was sent; False if ``timeout`` passed first."""
        queue = self._queue
        if queue is None:
            return True

        async def join() -> bool:
            try:
                await asyncio.wait_for(queue.join(), timeout)
            except asyncio.TimeoutError:
                return False
            return True

        return run_sync(join())

    async def _beat(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                answer = await self.api.arequest(
                    "POST",
                    f"{self._path}/heartbeat",
                    json={"incarnation": self.incarnation},
                    budget=max(1.0, self.heartbeat_interval / 2),
                )
            except ApiStaleIncarnation:
                self._fence()
                return
            except ApiError as exc:
                if not failing:
                    log.warning("preemptwatch: heartbeat of run %s failed: %s", self.id, exc)
                failing = True
                continue
            except Exception:
                log.exception("preemptwatch: heartbeat of run %s failed", self.id)
                continue
            if failing:
                log.warning("preemptwatch: heartbeat of run %s works again", self.id)
            failing = False
            state = str(answer.get("state", self.state))
            if state != self.state:
                log.warning(
                    "preemptwatch: the server now reports run %s as %s (were heartbeats "
                    "missing for longer than its timeout?)",
                    self.id,
                    state,
                )
            self.state = state
            self.preempting = self.preempting or bool(answer.get("preempting"))

    def _fence(self) -> None:
        """A newer incarnation exists: refuse further writes, say why, once."""
        with self._lock:
            if self.fenced:
                return
            self.fenced = True
        message = (
            f"preemptwatch: run {self.id} was resumed by another process; this process "
            f"(incarnation {self.incarnation}) is fenced off and its writes are refused"
        )
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        unregister_marker(self._on_notice)
        if self._heartbeat is not None:
            client_loop().call_soon_threadsafe(self._heartbeat.cancel)

    def mark_preempting(self, notice: Notice | Mapping[str, Any] | None = None) -> bool:
        """Tell the server this run is about to be preempted; True once it took it.

        The mark goes to the spool first, so it survives this process; the server is
        tried until the notice's deadline (or for 10 s), and a mark it did not take
        stays spooled for the next client or the sidecar to deliver.
        """
        self._check_writable()
        if isinstance(notice, Notice) and notice.seconds_left() is not None:
            budget = max(1.0, min(60.0, (notice.seconds_left() or 0.0) - 1.0))
        else:
            budget = DEFAULT_MARK_BUDGET
        self.preempting = True
        try:
            spooled = spool_mark(self.api.server, self.id, self.incarnation, notice)
        except OSError as exc:
            log.warning("preemptwatch: cannot spool the mark of run %s: %s", self.id, exc)
            spooled = None
        try:
            self.api.mark_preempting(self.id, self.incarnation, notice, budget=budget)
        except ApiStaleIncarnation as exc:
            if spooled is not None:
                spooled.unlink(missing_ok=True)
            self._fence()
            raise self._fenced_error() from exc
        except ApiUnavailable as exc:
            log.warning(
                "preemptwatch: run %s not marked preempting yet (%s); the mark waits in %s",
                self.id,
                exc,
                spooled,
            )
            return False
        except ApiError:
            if spooled is not None:
                spooled.unlink(missing_ok=True)
            raise
        if spooled is not None:
            spooled.unlink(missing_ok=True)
        log.info("preemptwatch: run %s marked preempting", self.id)
        return True

    def _on_notice(self, notice: Notice) -> None:
        """The marker the watcher calls on its first notice."""
        if self.finished or self.fenced:
            return
        self.mark_preempting(notice)

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike[str], name: str | None = None) -> dict[str, Any]:
        """Upload the file at ``path`` (streamed) as ``name`` (default: its file name);
        returns ``{"name", "size", "sha256"}``."""
        self._check_writable()
        try:
            return self.api.upload_file(self.id, self.incarnation, path, name)
        except ApiStaleIncarnation as exc:
            self._fence()
            raise self._fenced_error() from exc

    def restore(self, name: str, root: str | os.PathLike[str] = ".") -> Path:
        """Download the file saved as ``name`` (``./name`` works too) into ``root``,
        streamed; returns its path. Raises `ApiNotFound` when the run has no such file."""
        parts = [p for p in str(name).split("/") if p not in ("", ".")]
        if str(name).startswith("/") or not parts or any(p == ".." or "\\" in p for p in parts):
            raise ValueError(f"not a relative file name: {name!r}")
        name = "/".join(parts)
        return self.api.download_file(self.id, name, Path(root) / name)

    def files(self) -> list[dict[str, Any]]:
        """The files saved to this run."""
        return self.api.list_files(self.id)


def _plain(value: Any) -> Any:
    """``json.dumps`` fallback: numpy values and tensors become Python numbers or lists."""
    for method in ("tolist", "item"):
        convert = getattr(value, method, None)
        if callable(convert):
            return convert()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def to_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep, JSON-safe copy of ``data`` (see `Run.log`)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a dict, not {type(data).__name__}")
    text = json.dumps(dict(data), default=_plain)
    copy: dict[str, Any] = json.loads(text, parse_constant=str)
    return copy


def _finish_active_at_exit(code: int | None) -> None:
    run = _active
    if run is None or run.finished:
        return
    if code is None:
        # ``raise SystemExit(...)`` ended the script; its code cannot be read. After a
        # mark, count it as non-zero so the run is requeued rather than lost.
        code = 1 if run.preempting else 0
        log.warning(
            "preemptwatch: the script ended with SystemExit but its code is unknown (use "
            "sys.exit(code)); finishing run %s with exit code %d",
            run.id,
            code,
        )
    run.finish(code, timeout=10.0)


def init(
    project: str | None = None,
    id: str | None = None,
    resume: str | bool | None = None,
    config: Mapping[str, Any] | None = None,
    server: str | None = None,
    *,
    api_key: str | None = None,
    sweep_id: str | None = None,
    heartbeat_interval: float = 30.0,
    instance_id: str | None = None,
) -> Run:
    """Start or resume a run on the server; returns the `Run` (also the active run).

    ``resume``: ``"never"`` (default) creates the run and refuses an existing ID;
    ``"allow"`` resumes an existing ID or creates it; ``"must"`` resumes or raises
    `ApiNotFound`; ``"auto"``/``True`` resumes the run last started from this directory
    if it did not finish, else creates one. Settings default to ``PREEMPTWATCH_SERVER``,
    ``PREEMPTWATCH_API_KEY``, ``PREEMPTWATCH_PROJECT``, ``PREEMPTWATCH_RUN_ID``,
    ``PREEMPTWATCH_RESUME`` and ``PREEMPTWATCH_SWEEP_ID``; ``config`` defaults to the
    parameters a sweep agent passes in ``PREEMPTWATCH_SWEEP_PARAMS``.
    """
    settings = Settings.resolve(
        server=server,
        api_key=api_key,
        project=project,
        run_id=id,
        resume=resume,
        sweep_id=sweep_id,
    )
    if not heartbeat_interval > 0:
        raise ConfigError(f"heartbeat_interval must be positive, not {heartbeat_interval!r}")
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict, not {type(config).__name__}")
    if config is None:
        config = _sweep_params()
    current = active_run()
    if current is not None:
        raise RuntimeError(f"run {current.id} is still active; call run.finish() first")

    api = ApiClient(settings.server, settings.api_key)
    try:
        deliver_spool(api)  # so a run marked by a process that died can be resumed
    except Exception:
        log.exception("preemptwatch: could not deliver spooled marks")
    root = Path.cwd()
    mode, run_id = settings.resume, settings.run_id
    if mode == "auto":
        last = autoresume.read_last_run(settings.server, root)
        run_id = normalize_run_id(last) if last else run_id
        mode = "allow" if run_id else "never"
    meta: dict[str, Any] = {"pid": os.getpid(), "argv": list(sys.argv), "cwd": str(root)}
    if slurm.in_job():
        meta.update(slurm.job_meta())  # job ID, SLURM_RESTART_COUNT, partition, node
    if settings.project:
        meta["project"] = settings.project
    record = api.create_run(
        id=run_id,
        resume=mode,
        config=config,
        instance_id=instance_id or platform.instance_id(),
        host=platform.host_name(),
        sweep_id=settings.sweep_id,
        meta=meta,
    )
    run = Run(api, record, root=root, heartbeat_interval=heartbeat_interval)
    if settings.project and run.project and run.project != settings.project:
        log.info(
            "preemptwatch: the API key belongs to project %r, not %r; run %s is in %r",
            run.project,
            settings.project,
            run.id,
            run.project,
        )
    autoresume.record_run(settings.server, run.id, run.incarnation, root)
    run._start()
    log.info(
        "preemptwatch: %s run %s (incarnation %d, last step %d)",
        "resumed" if run.resumed else "started",
        run.id,
        run.incarnation,
        run.step,
    )
    return run


def _sweep_params() -> dict[str, Any] | None:
    """The sweep parameters the agent passed in ``PREEMPTWATCH_SWEEP_PARAMS``, if any."""
    raw = os.environ.get("PREEMPTWATCH_SWEEP_PARAMS")
    if not raw:
        return None
    try:
        params = json.loads(raw)
    except ValueError as exc:
        log.warning("preemptwatch: ignoring PREEMPTWATCH_SWEEP_PARAMS, not JSON: %s", exc)
        return None
    if not isinstance(params, dict):
        log.warning("preemptwatch: ignoring PREEMPTWATCH_SWEEP_PARAMS, not a JSON object")
        return None
    return params


def mark_preempting(notice: Notice | Mapping[str, Any] | None = None) -> bool:
    """Mark the active run preempting (see `Run.mark_preempting`); False without one."""
    run = active_run()
    if run is None:
        log.warning("preemptwatch: mark_preempting() called with no active run")
        return False
    return run.mark_preempting(notice)
