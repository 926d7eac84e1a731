"""The sweep agent: ``preemptwatch agent SWEEP_ID [--count N]``.

It registers with the server, then repeatedly claims the next run of the sweep (requeued
runs first, oldest first, then new parameter sets from the search method) and launches the
sweep's program for it with ``PREEMPTWATCH_RUN_ID``, ``PREEMPTWATCH_SWEEP_ID``, the
parameters as arguments (and as JSON in ``PREEMPTWATCH_SWEEP_PARAMS``), and
``PREEMPTWATCH_RESUME=allow`` for a requeued run (so it logs on from its last step). While
the child runs, the agent heartbeats (which also keeps the run alive on the server when the
child does not heartbeat itself), forwards SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 to it, and
when it exits reports its exit code: the run is finished with it if the child did not
finish the run itself (after SIGTERM, as a preempted run).
SIGTERM or SIGINT to the agent also means: take no further runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .client.api import ApiClient
from .errors import ApiConflict, ApiError, ApiNotFound, ApiUnavailable
from .sweeps.api import SweepApi
from .sweeps.command import build_command
from .sweeps.config import SweepConfig, parse_config

if TYPE_CHECKING:
    from .watcher import Watcher

log = logging.getLogger("preemptwatch.agent")

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
#: The agent gives up after this many runs in a row failed this soon after their start
#: (a broken command would otherwise burn through the whole sweep).
MAX_QUICK_FAILURES = 3
QUICK_FAILURE = 10.0
#: Signals after which the agent takes no further runs.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code_of(returncode: int) -> int:
    """A process's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class Agent:
    """Runs a sweep's runs one after the other on this machine.

    ``count`` limits how many runs it takes; ``poll_interval`` is how long it waits when
    the sweep is paused or has nothing to hand out yet; ``heartbeat_interval`` defaults to a
    quarter of the server's heartbeat timeout (at most 30 s); ``kill_grace`` is how long a
    child of a cancelled sweep has between SIGTERM and SIGKILL. With ``watch`` the agent
    watches the machine's cloud metadata (every ``watch_interval`` seconds) and takes no
    new run once a preemption notice arrived.
    """

    def __init__(
        self,
        sweep_id: str,
        client: ApiClient,
        *,
        count: int | None = None,
        poll_interval: float = 5.0,
        heartbeat_interval: float | None = None,
        kill_grace: float = 30.0,
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
        watch: bool = True,
        watch_interval: float = 1.0,
    ) -> None:
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        self.sweep_id = sweep_id
        self.client = client
        self.api = SweepApi(client)
        self.count = count
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.kill_grace = kill_grace
        self.workdir = workdir or Path.cwd()
        self.base_env = dict(os.environ if env is None else env)
        self.agent_id: str | None = None
        self.config: SweepConfig | None = None
        self.completed = 0
        self._child: subprocess.Popen[bytes] | None = None
        self._run_id: str | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.RLock()  # also taken in signal handlers
        self._terminated = False  # SIGTERM reached the agent while a child ran
        self.watch = watch
        self.watch_interval = watch_interval
        self._watcher: Watcher | None = None

    # ----------------------------------------------------------------- lifecycle

    def register(self) -> None:
        """Register with the server and read the sweep's config."""
        answer = self.api.register_agent(self.sweep_id, host=socket.gethostname(), pid=os.getpid())
        self.agent_id = answer["id"]
        self.config = parse_config(answer["sweep"]["config"])
        if self.heartbeat_interval is None:
            self.heartbeat_interval = max(0.2, min(30.0, answer["heartbeat_timeout"] / 4))
        log.info("agent %s of sweep %s registered", self.agent_id, self.sweep_id)

    def run(self) -> int:
        """Take and run runs until the sweep ends, ``count`` runs are done, or a stop
        signal; returns the agent's exit code: 0, or 1 after `MAX_QUICK_FAILURES` runs in
        a row failed right after their start."""
        self.register()
        if self.watch:
            self._watcher = self._start_watcher()
        previous = self._install_signals()
        beat = threading.Thread(target=self._heartbeats, name="preemptwatch-agent-hb", daemon=True)
        beat.start()
        failures = 0
        try:
            while not self._stop.is_set():
                if self.count is not None and self.completed >= self.count:
                    break
                if self._doomed():
                    break
                try:
                    answer = self._next()
                except ApiUnavailable as exc:
                    # The server is down or restarting: keep the machine, ask again.
                    log.warning("cannot get the next run: %s; retrying", exc)
                    self._stop.wait(self.poll_interval)
                    continue
                run = answer.get("run")
                if run is None:
                    state = answer.get("sweep_state")
                    if state in ("finished", "cancelled"):
                        log.info("sweep %s is %s; agent done", self.sweep_id, state)
                        break
                    self._stop.wait(self.poll_interval)
                    continue
                started = time.monotonic()
                ended = self._launch(run)
                self.completed += 1
                if ended == "preempted" and self._watcher is not None:
                    # Preempted because this machine is going away? Give the agent's own
                    # watcher a poll to see the notice before it takes another run.
                    self._watcher.wait(self.watch_interval + 1.0)
                # a preempted run is not the program's fault: only failures count
                quick = ended == "failed" and time.monotonic() - started < QUICK_FAILURE
                failures = failures + 1 if quick else 0
                if failures >= MAX_QUICK_FAILURES and not self._stop.is_set():
                    log.error(
                        "%d runs in a row failed within %g s of their start; stopping this "
                        "agent (check the sweep's program and command)",
                        failures,
                        QUICK_FAILURE,
                    )
                    return 1
        finally:
            self._done.set()
            beat.join(5)
            if self._watcher is not None:
                self._watcher.stop()
            for signum, handler in previous.items():
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signum, handler)
        return 0

    def _start_watcher(self) -> Watcher | None:
        """Watch this machine's cloud metadata (no signal handlers: the agent forwards
        signals itself), so a machine with a preemption notice takes no new runs."""
        try:
            from .watcher import Watcher

            polling = {"interval": self.watch_interval}
            watcher = Watcher(
                detect=("ec2", "gcp", "azure"),
                mark=False,
                detect_options={"ec2": polling, "azure": polling},
            )
            watcher.start_in_thread()
            return watcher
        except Exception as exc:  # never let watching stop the agent
            log.warning("cannot watch this machine for preemption notices: %s", exc)
            return None

    def _doomed(self) -> bool:
        """Whether this machine got a preemption notice (then it takes no new runs)."""
        watcher = self._watcher
        if watcher is None or not watcher.preempting:
            return False
        what = f"{watcher.notice.source} {watcher.notice.kind}" if watcher.notice else "a"
        log.warning("this machine got a %s notice: taking no further runs", what)
        return True

    def _next(self) -> dict[str, Any]:
        assert self.agent_id is not None
        try:
            return self.api.next_run(self.sweep_id, self.agent_id)
        except ApiConflict:
            # Declared gone after missing heartbeats (e.g. the machine was suspended).
            log.warning(
                "agent %s was declared gone by the server; registering again", self.agent_id
            )
            self.register()
            return self.api.next_run(self.sweep_id, self.agent_id)

    # ----------------------------------------------------------------- one run

    def child_env(self, run: Mapping[str, Any]) -> dict[str, str]:
        """The environment of the child for ``run``."""
        env = dict(self.base_env)
        env["PREEMPTWATCH_RUN_ID"] = run["id"]
        env["PREEMPTWATCH_SWEEP_ID"] = self.sweep_id
        env["PREEMPTWATCH_RESUME"] = "allow" if run.get("requeued") else "never"
        env["PREEMPTWATCH_SWEEP_PARAMS"] = json.dumps(run["params"])
        env["PREEMPTWATCH_SERVER"] = self.client.server
        if self.client.api_key:
            env["PREEMPTWATCH_API_KEY"] = self.client.api_key
        return env

    def command(self, run: Mapping[str, Any]) -> list[str]:
        """The command line of the child for ``run``."""
        assert self.config is not None
        json_file = self.workdir / ".preemptwatch" / f"sweep-{self.sweep_id}" / f"{run['id']}.json"
        return build_command(
            self.config.command,
            run["params"],
            program=self.config.program,
            json_file=json_file,
            env=self.base_env,
        )

    def _incarnation(self, run_id: str) -> int:
        """The run's incarnation now (0 when it does not exist yet)."""
        try:
            return int(self.client.get_run(run_id)["incarnation"])
        except ApiNotFound:
            return 0
        except ApiError as exc:
            log.warning("could not read run %s: %s", run_id, exc)
            return -1

    def _launch(self, run: Mapping[str, Any]) -> str | None:
        """Run the child for ``run``; returns the run's state once it ended (None when
        the server could not tell)."""
        run_id = run["id"]
        before = self._incarnation(run_id) if run.get("requeued") else 0
        try:
            argv = self.command(run)
            log.info("run %s%s: %s", run_id, " (requeued)" if run.get("requeued") else "", argv)
            child = subprocess.Popen(
                argv, env=self.child_env(run), cwd=self.workdir, start_new_session=True
            )
        except (OSError, ValueError) as exc:
            log.error("cannot start run %s: %s", run_id, exc)
            code = 127
        else:
            with self._lock:
                self._child, self._run_id = child, run_id
                self._terminated = False
            code = exit_code_of(child.wait())
            with self._lock:
                self._child, self._run_id = None, None
        log.info("run %s exited with %d", run_id, code)
        return self._settle(run, code, before)

    def _settle(self, run: Mapping[str, Any], code: int, before: int) -> str | None:
        """Finish the run with the child's exit code unless the child did, then release
        the claim; returns the run's final state. A failure here is logged, never raised:
        the next run still goes."""
        run_id = run["id"]
        ended: str | None = None
        try:
            try:
                state = self.client.get_run(run_id)
            except ApiNotFound:
                state = None
            if state is None or (state["incarnation"] == before and state["state"] != "running"):
                # The child never used the client: record the run and how it ended.
                state = self.client.create_run(
                    id=run_id, resume="allow", config=run["params"], sweep_id=self.sweep_id
                )
            if state["state"] == "running":
                if self._terminated and code != 0 and not state["preempting"]:
                    # SIGTERM is how SLURM, Kubernetes and shutdowns preempt: a child
                    # that did not mark its run itself still gets it requeued.
                    self.client.mark_preempting(state["id"], state["incarnation"])
                state = self.client.finish(run_id, state["incarnation"], code)
            ended = str(state["state"])
        except ApiError as exc:
            log.warning("could not record the end of run %s: %s", run_id, exc)
        try:
            assert self.agent_id is not None
            self.api.report_exit(self.sweep_id, self.agent_id, run_id, code)
        except ApiError as exc:
            log.warning("could not report the exit of run %s: %s", run_id, exc)
        return ended

    # ----------------------------------------------------------------- background

    def _heartbeats(self) -> None:
        assert self.heartbeat_interval is not None
        while not self._done.wait(self.heartbeat_interval):
            try:
                assert self.agent_id is not None
                answer = self.api.heartbeat(self.sweep_id, self.agent_id)
            except ApiError as exc:
                log.warning("agent heartbeat failed: %s", exc)
                continue
            if answer.get("stop"):
                self._stop.set()
                self._terminate_child()

    def _terminate_child(self) -> None:
        with self._lock:
            child = self._child
        if child is None or child.poll() is not None:
            return
        log.warning("sweep %s was cancelled: stopping the run", self.sweep_id)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum in STOP_SIGNALS:
            self._stop.set()
        if signum == signal.SIGTERM:
            self._terminated = True
        with self._lock:
            child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
