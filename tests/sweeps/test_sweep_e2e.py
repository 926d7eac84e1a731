"""End to end with real processes: a server, 4 agents on 4 simulated EC2 machines, a grid
sweep of 20 runs; the test preempts random runs mid-training (their machine then leaves and
a fresh one joins) and kills one agent with its run outright. Every run must end finished
exactly once, and every requeued run must start resumed and log on from its last step: no
step twice, none skipped."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sweep_helpers import API_KEY, ServerProcess, start_server_process

from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator
from preemptwatch.sweeps.api import SweepApi

PROGRAM = Path(__file__).parent / "programs" / "train.py"
STEPS = 20
AGENTS = 4
PREEMPTIONS = 6


def events(out: Path) -> list[dict[str, Any]]:
    found = []
    for path in out.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                found.append(json.loads(line))
    return found


def current_child(out: Path, agent_pid: int) -> int | None:
    """The pid of the training process the agent runs now, if any."""
    by_pid: dict[int, list[str]] = defaultdict(list)
    for e in events(out):
        if e["agent"] == agent_pid:
            by_pid[e["pid"]].append(e["event"])
    for pid, kinds in by_pid.items():
        # mid-training: some steps done and enough left to see the notice in time
        if "finished" in kinds or "preempted" in kinds:
            continue
        if 2 <= kinds.count("log") <= STEPS - 6:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return pid
    return None


class Machine:
    """An agent process with the EC2 simulator of its machine."""

    def __init__(self, server: ServerProcess, sweep: str, tmp: Path, out: Path, n: int) -> None:
        self.sim = EC2Simulator(instance_id=f"i-e2e{n:012d}")
        self.thread = SimulatorThread(self.sim)
        url = self.thread.start()
        workdir = tmp / f"machine{n}"
        workdir.mkdir()
        env = {
            **os.environ,
            "PREEMPTWATCH_SERVER": server.url,
            "PREEMPTWATCH_API_KEY": API_KEY,
            "PREEMPTWATCH_INTERPRETER": sys.executable,
            "PREEMPTWATCH_EC2_METADATA_URL": url,
            "PREEMPTWATCH_SPOOL_DIR": str(workdir / "spool"),
            "XDG_STATE_HOME": str(workdir / "state"),
            "SWEEP_TEST_OUT": str(out),
            "SWEEP_TEST_STEPS": str(STEPS),
        }
        argv = [sys.executable, "-m", "preemptwatch", "agent", sweep, "--poll-interval", "0.2"]
        self.log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=self.log, stderr=self.log)

    def notice(self, on: bool) -> None:
        if on:
            self.thread.call(self.sim.schedule, "terminate", 0.0)
        else:
            self.thread.call(self.sim.clear)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.thread.stop()
        self.log.close()


def test_sweep_of_20_runs_with_preemptions_and_a_dead_agent(tmp_path: Path) -> None:
    rng = random.Random(4)
    out = tmp_path / "events"
    out.mkdir()
    server = start_server_process(
        f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, heartbeat_timeout=2.0, reap_interval=0.2
    )
    machines: list[Machine] = []
    client = server.client()
    try:
        api = SweepApi(client)
        sweep = api.create(
            {
                "method": "grid",
                "program": str(PROGRAM),
                "requeue_crashed": True,
                "metric": {"name": "loss", "goal": "minimize"},
                "parameters": {"a": {"values": [1, 2, 3, 4, 5]}, "b": {"min": 1, "max": 4}},
            }
        )["id"]
        machines = [Machine(server, sweep, tmp_path, out, n) for n in range(AGENTS)]
        active = machines[1:]  # machines[0] dies first
        preempted, killed_run = 0, None
        deadline = time.monotonic() + 150
        while api.get(sweep)["state"] != "finished":
            assert time.monotonic() < deadline, f"sweep not finished: {api.get(sweep)}"
            time.sleep(rng.uniform(0.1, 0.3))
            if killed_run is None:
                child = current_child(out, machines[0].proc.pid)
                if child is not None:
                    # the machine dies: agent and run killed outright, no notice, no exit code
                    machines[0].proc.kill()
                    os.kill(child, signal.SIGKILL)
                    killed_run = next(
                        e["run"] for e in events(out) if e["pid"] == child and e["event"] == "start"
                    )
                    machines.append(Machine(server, sweep, tmp_path, out, len(machines)))
                    active.append(machines[-1])
                continue
            if preempted >= PREEMPTIONS:
                continue
            machine = rng.choice(active)
            child = current_child(out, machine.proc.pid)
            if child is None:
                continue
            machine.notice(True)
            stop_at = time.monotonic() + 10
            ended: set[str] = set()
            while time.monotonic() < stop_at and not ended & {"preempted", "finished"}:
                time.sleep(0.02)
                ended = {e["event"] for e in events(out) if e["pid"] == child}
            preempted += "preempted" in ended
            # the agent of a machine with a notice takes no new run: it leaves, and a
            # fresh machine takes its place
            assert machine.proc.wait(15) == 0
            active.remove(machine)
            machines.append(Machine(server, sweep, tmp_path, out, len(machines)))
            active.append(machines[-1])
        for machine in active:
            assert machine.proc.wait(30) == 0  # agents leave once the sweep is finished

        runs = client.list_runs(sweep_id=sweep, limit=1000)
        assert len(runs) == 20
        assert {r["state"] for r in runs} == {"finished"}
        assert sorted((r["config"]["a"], r["config"]["b"]) for r in runs) == sorted(
            (a, b) for a in range(1, 6) for b in range(1, 5)
        )
        by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in events(out):
            by_run[e["run"]].append(e)
        assert set(by_run) == {r["id"] for r in runs}
        requeued = 0
        for run in runs:
            evs = by_run[run["id"]]
            assert [e["event"] for e in evs].count("finished") == 1
            # the server holds every step exactly once ...
            steps = [h["step"] for h in client.history(run["id"])]
            assert steps == list(range(STEPS)), run["id"]
            # ... and no step was logged twice across incarnations
            logged = Counter(e["step"] for e in evs if e["event"] == "log")
            assert all(n == 1 for n in logged.values()), (run["id"], logged)
            starts = sorted(
                (e for e in evs if e["event"] == "start"), key=lambda e: e["incarnation"]
            )
            assert starts[0]["resumed"] is False and starts[0]["step"] == -1
            for earlier, later in itertools.pairwise(starts):
                requeued += 1
                assert later["resumed"] is True
                before = [
                    e["step"]
                    for e in evs
                    if e["event"] == "log" and e["incarnation"] <= earlier["incarnation"]
                ]
                assert later["step"] >= max(before, default=-1)
                first = min(
                    e["step"]
                    for e in evs
                    if e["event"] == "log" and e["incarnation"] == later["incarnation"]
                )
                assert first == later["step"] + 1  # logs on from its last step
        assert preempted >= 3, preempted
        assert requeued >= preempted + 1  # each preemption, and the killed run
        killed = sorted(e["incarnation"] for e in by_run[killed_run] if e["event"] == "start")
        assert len(killed) >= 2  # the run of the dead machine was resumed elsewhere
        assert api.get(sweep)["state"] == "finished"
    finally:
        for machine in machines:
            machine.stop()
        client.close()
        server.stop()
