"""The agent as a real process: environment and arguments of the child, exit codes,
signal forwarding, ``--count``, cancelling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sweep_helpers import API_KEY, ServerThread, start_server_thread

PROGRAM = Path(__file__).parent / "programs" / "record.py"


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    """An in-process server on SQLite; heartbeat timeout 1 s (agents beat every 0.25 s)."""
    server = start_server_thread(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, 1.0)
    try:
        yield server
    finally:
        server.thread.stop()


def sweep_config(params: dict[str, Any], method: str = "grid", **extra: Any) -> dict[str, Any]:
    return {"method": method, "program": str(PROGRAM), "parameters": params, **extra}


def start_agent(srv: ServerThread, sweep_id: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
    out.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PREEMPTWATCH_SERVER": srv.url,
        "PREEMPTWATCH_API_KEY": API_KEY,
        "PREEMPTWATCH_INTERPRETER": sys.executable,
        "SWEEP_TEST_OUT": str(out),
    }
    argv = [sys.executable, "-m", "preemptwatch", "agent", sweep_id, "--poll-interval", "0.1"]
    return subprocess.Popen([*argv, *args], env=env, cwd=out)


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def wait_for(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_agent_runs_a_grid_sweep_to_the_end(srv: ServerThread, tmp_path: Path) -> None:
    api, client = srv.sweeps(), srv.client()
    params = {"a": {"values": [1, 2, 3]}, "flag": {"value": True}, "name": {"value": "x y"}}
    sweep = api.create(sweep_config(params))["id"]
    out = tmp_path / "out"
    agent = start_agent(srv, sweep, out)
    assert agent.wait(60) == 0  # exits by itself once the sweep is finished
    got = records(out)
    assert len(got) == 3
    assert sorted(r["params"]["a"] for r in got.values()) == ["1", "2", "3"]
    for run_id, record in got.items():
        assert record["env"]["PREEMPTWATCH_RUN_ID"] == run_id
        assert record["env"]["PREEMPTWATCH_SWEEP_ID"] == sweep
        assert record["env"]["PREEMPTWATCH_RESUME"] == "never"
        assert record["env"]["PREEMPTWATCH_SERVER"] == srv.url
        assert record["argv"][1:] == ["--flag=True", "--name=x y"]
        # the child did not use the client: the agent recorded the run and its end
        run = client.get_run(run_id)
        assert (run["state"], run["exit_code"], run["sweep_id"]) == ("finished", 0, sweep)
        assert run["config"]["a"] == int(record["params"]["a"])
    assert api.get(sweep)["state"] == "finished"


def test_count_and_exit_codes(srv: ServerThread, tmp_path: Path) -> None:
    api, client = srv.sweeps(), srv.client()
    sweep = api.create(sweep_config({"mode": {"values": ["exit3"]}}, method="random"))["id"]
    out = tmp_path / "out"
    assert start_agent(srv, sweep, out, "--count", "2").wait(60) == 0
    got = records(out)
    assert len(got) == 2
    for run_id in got:
        run = client.get_run(run_id)
        assert (run["state"], run["exit_code"]) == ("failed", 3)
    assert api.get(sweep)["state"] == "running"  # random search never runs out


def test_signals_forwarded_and_sigterm_requeues(srv: ServerThread, tmp_path: Path) -> None:
    api, client = srv.sweeps(), srv.client()
    sweep = api.create(sweep_config({"mode": {"values": ["wait"]}}, method="random"))["id"]
    out = tmp_path / "out"
    agent = start_agent(srv, sweep, out)
    (run_id,) = wait_for(lambda: list(records(out)))
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        agent.send_signal(sig)
        wait_for(lambda s=sig: s.name in records(out)[run_id]["signals"])
    assert agent.wait(30) == 0  # SIGTERM: no further runs
    assert records(out)[run_id]["signals"] == ["SIGUSR1", "SIGUSR2", "SIGTERM"]
    assert len(records(out)) == 1
    run = client.get_run(run_id)
    # terminated, exit 143: as a preemption, so the run is queued again
    assert (run["state"], run["exit_code"], run["requeues"]) == ("preempted", 143, 1)
    assert api.get(sweep)["queued"] == 1


def test_sigint_forwarded_stops_the_agent_run_failed(srv: ServerThread, tmp_path: Path) -> None:
    api, client = srv.sweeps(), srv.client()
    sweep = api.create(sweep_config({"mode": {"values": ["wait"]}}, method="random"))["id"]
    out = tmp_path / "out"
    agent = start_agent(srv, sweep, out)
    (run_id,) = wait_for(lambda: list(records(out)))
    agent.send_signal(signal.SIGINT)
    assert agent.wait(30) == 0
    assert records(out)[run_id]["signals"] == ["SIGINT"]
    run = client.get_run(run_id)
    # interrupted by hand, not preempted: failed, not queued again
    assert (run["state"], run["exit_code"]) == ("failed", 130)
    assert api.get(sweep)["queued"] == 0


def test_requeued_run_gets_resume_allow(srv: ServerThread, tmp_path: Path) -> None:
    api, client = srv.sweeps(), srv.client()
    sweep = api.create(sweep_config({"a": {"values": [7]}}))["id"]
    agent_id = api.register_agent(sweep)["id"]
    first = api.next_run(sweep, agent_id)["run"]
    run = client.create_run(id=first["id"], sweep_id=sweep, config=first["params"])
    client.mark_preempting(run["id"], run["incarnation"])
    client.finish(run["id"], run["incarnation"], 1)
    api.report_exit(sweep, agent_id, run["id"], 1)
    out = tmp_path / "out"
    assert start_agent(srv, sweep, out).wait(60) == 0
    record = records(out)[first["id"]]
    assert record["env"]["PREEMPTWATCH_RESUME"] == "allow"
    assert record["params"] == {"a": "7"}
    run = client.get_run(first["id"])
    assert (run["state"], run["incarnation"], run["resumed"]) == ("finished", 2, True)


def test_cancel_stops_the_running_child(srv: ServerThread, tmp_path: Path) -> None:
    api = srv.sweeps()
    sweep = api.create(sweep_config({"mode": {"values": ["wait"]}}, method="random"))["id"]
    out = tmp_path / "out"
    agent = start_agent(srv, sweep, out)
    (run_id,) = wait_for(lambda: list(records(out)))
    api.transition(sweep, "cancel")
    assert agent.wait(30) == 0
    assert records(out)[run_id]["signals"] == ["SIGTERM"]
    assert len(records(out)) == 1


def test_agent_stops_after_runs_keep_failing_at_once(srv: ServerThread, tmp_path: Path) -> None:
    api, client = srv.sweeps(), srv.client()
    sweep = api.create(
        {
            "method": "random",
            "command": ["/nonexistent/program", "${args}"],
            "parameters": {"x": {"min": 0.0, "max": 1.0}},
        }
    )["id"]
    assert start_agent(srv, sweep, tmp_path / "out").wait(60) == 1
    runs = client.list_runs(sweep_id=sweep)
    assert len(runs) == 3  # then it gave up instead of burning the sweep
    assert {(r["state"], r["exit_code"]) for r in runs} == {("failed", 127)}


def test_agent_for_unknown_sweep_fails_clearly(srv: ServerThread) -> None:
    env = {**os.environ, "PREEMPTWATCH_SERVER": srv.url, "PREEMPTWATCH_API_KEY": API_KEY}
    done = subprocess.run(
        [sys.executable, "-m", "preemptwatch", "agent", "nosuchsweep"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "preemptwatch agent: no sweep 'nosuchsweep'" in done.stderr
