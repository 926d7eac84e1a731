"""End to end, every part a real process: the EC2 metadata simulator, the server, the
sidecar (``preemptwatch watch``) and two training processes on the same instance. The
sidecar rides out the metadata faults the watcher does and a server outage."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sidecar_helpers import Receiver, free_port

from preemptwatch.server.testing import ServerProcess
from preemptwatch.simulate import serve

INSTANCE = "i-0e2e0e2e0e2e0e2e0"

TRAIN = """
import os, signal, sys, time
import preemptwatch
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(time.time()))
run = preemptwatch.init(id=os.environ["RUN_ID"], resume="allow", heartbeat_interval=1.0)
with open(os.environ["PID_FILE"], "w") as out:
    out.write(str(os.getpid()))
print("ready", run.id, run.instance_id if hasattr(run, "instance_id") else "", flush=True)
while not got:
    time.sleep(0.02)
print("signalled", flush=True)
time.sleep(120)
"""


class Proc:
    """A child process whose output goes to a file we can wait on."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log: Path, *, kill: bool = False
    ) -> None:
        self.log = log
        self.kill = kill  # end with SIGKILL (training stand-ins), not SIGTERM
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.popen.poll() is not None:
                raise AssertionError(f"exited {self.popen.returncode} before {text!r}:\n{out}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            if self.kill:
                self.popen.kill()
            else:
                self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


async def http(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=kwargs.pop("timeout", 10))
    async with aiohttp.ClientSession(timeout=timeout) as s, s.request(method, url, **kwargs) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def eventually(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.1)


async def test_one_notice_marks_signals_notifies_and_serves(
    tmp_path: Path, procs: list[Proc]
) -> None:
    # The webhook receiver, in this process.
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = await serve(app)
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"

    sim_port, sidecar_port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim = Proc(
        [
            sys.executable,
            "-m",
            "preemptwatch",
            "simulate",
            "ec2",
            "--port",
            str(sim_port),
            "--instance-id",
            INSTANCE,
        ],
        {},
        tmp_path / "sim.log",
    )
    procs.append(sim)
    await sim.wait_for("metadata simulator on")

    server = ServerProcess(f"sqlite:///{tmp_path / 'pw.db'}", workdir=tmp_path / "server")
    server.start()
    try:
        env = {
            "PREEMPTWATCH_SERVER": server.url,
            "PREEMPTWATCH_API_KEY": server.api_key,
            "PREEMPTWATCH_EC2_METADATA_URL": sim_url,
            "PREEMPTWATCH_SPOOL_DIR": str(tmp_path / "client-spool"),
        }
        script = tmp_path / "train.py"
        script.write_text(TRAIN)
        pid_files = []
        for name in ("train-a", "train-b"):
            pid_file = tmp_path / f"{name}.pid"
            pid_files.append(pid_file)
            proc = Proc(
                [sys.executable, str(script)],
                {**env, "RUN_ID": name, "PID_FILE": str(pid_file)},
                tmp_path / f"{name}.log",
                kill=True,
            )
            procs.append(proc)
        trainers = procs[-2:]
        for proc in trainers:
            await proc.wait_for("ready")
        for name in ("train-a", "train-b"):
            status, run = await http(
                "GET", f"{server.url}/api/v1/runs/{name}", headers=server.headers()
            )
            assert status == 200 and run["instance_id"] == INSTANCE and not run["preempting"]

        sidecar = Proc(
            [
                sys.executable,
                "-m",
                "preemptwatch",
                "watch",
                "--sources",
                "ec2",
                "--interval",
                "0.2",
                "--port",
                str(sidecar_port),
                "--pid-file",
                str(pid_files[0]),
                "--pid-file",
                str(pid_files[1]),
                "--signal",
                "USR1",
                "--webhook",
                receiver.url,
                "--spool-dir",
                str(tmp_path / "spool"),
            ],
            {**env},
            tmp_path / "sidecar.log",
        )
        procs.append(sidecar)
        side_url = f"http://127.0.0.1:{sidecar_port}"
        await sidecar.wait_for("preemptwatch sidecar on")

        async def found_instance() -> bool:
            status, health = await http("GET", f"{side_url}/healthz")
            return status == 200 and health["instance_id"] == INSTANCE

        await eventually(found_instance, 20, "instance ID discovery")

        # The watcher's fault list, one after another, while nothing is scheduled.
        for fault in (
            {"status": 401},
            {"status": 403},
            {"status": 500, "count": 3},
            {"status": 503},
            {"mode": "timeout"},
            {"mode": "garbage"},
            {"mode": "reset"},
        ):
            status, _ = await http("POST", f"{sim_url}/_control/fault", json=fault)
            assert status == 200, fault

        async def faults_consumed() -> bool:
            _, state = await http("GET", f"{sim_url}/_control/state")
            return not state["faults"]

        await eventually(faults_consumed, 30, "fault consumption")
        assert sidecar.popen.poll() is None
        status, health = await http("GET", f"{side_url}/healthz")
        assert status == 200 and health["sources"]["ec2"]["running"]
        _, metrics = await http("GET", f"{side_url}/metrics")
        errors = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('preemptwatch_poll_errors_total{source="ec2"}')
        ]
        assert errors and errors[0] >= 1

        # The server goes away; then the notice comes.
        server.stop()
        poll = asyncio.ensure_future(http("GET", f"{side_url}/v1/notice?wait=60", timeout=70))
        await asyncio.sleep(0.3)
        assert not poll.done()
        status, _ = await http("POST", f"{sim_url}/_control/schedule", json={"kind": "terminate"})
        assert status == 200
        status, answer = await asyncio.wait_for(poll, 30)
        received = time.time()
        assert status == 200 and answer["preempting"] is True
        notice = answer["notice"]
        assert notice["source"] == "ec2" and notice["kind"] == "terminate"
        detected = datetime.fromisoformat(notice["detected_at"]).timestamp()
        assert received - detected < 0.05, f"answered {1000 * (received - detected):.1f} ms late"

        for proc in trainers:
            await proc.wait_for("signalled", 10)
        await asyncio.wait_for(receiver.got.wait(), 15)
        assert receiver.bodies[0]["notice"]["kind"] == "terminate"
        assert receiver.bodies[0]["instance_id"] == INSTANCE

        async def spooled() -> bool:
            _, health = await http("GET", f"{side_url}/healthz")
            return health["pending_marks"] == 1

        await eventually(spooled, 10, "spooling the mark")

        # The server returns: the spooled mark is delivered, both runs are marked.
        server.start()

        async def both_marked() -> bool:
            marked = []
            for name in ("train-a", "train-b"):
                status, run = await http(
                    "GET", f"{server.url}/api/v1/runs/{name}", headers=server.headers()
                )
                marked.append(status == 200 and run["preempting"])
            return all(marked)

        await eventually(both_marked, 40, "marking both runs")
        await eventually(lambda: _no_pending(side_url), 10, "emptying the spool")
        await asyncio.sleep(0.5)
        assert len(receiver.bodies) == 1 and receiver.attempts == 1  # one webhook call
        _, metrics = await http("GET", f"{side_url}/metrics")
        assert 'preemptwatch_actions_total{action="mark",outcome="ok"} 1.0' in metrics
        assert 'preemptwatch_actions_total{action="webhook",outcome="ok"} 1.0' in metrics
        assert 'preemptwatch_actions_total{action="signal",outcome="ok"} 1.0' in metrics
        assert sidecar.popen.poll() is None
    finally:
        server.stop()
        await runner.cleanup()


async def _no_pending(url: str) -> bool:
    _, health = await http("GET", f"{url}/healthz")
    return health["pending_marks"] == 0
