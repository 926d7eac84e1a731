"""The sweep API on a real server application (SQLite and PostgreSQL, controlled clock):
queue before search, requeue limits, agents that die, grid exhaustion, pause/cancel, bad
sweep files."""

from __future__ import annotations

from typing import Any

import pytest
from sweep_helpers import ServerThread

from preemptwatch.client.api import ApiClient
from preemptwatch.errors import ApiBadRequest, ApiConflict, ApiNotFound
from preemptwatch.sweeps.api import SweepApi

RANDOM = {
    "method": "random",
    "program": "train.py",
    "parameters": {"lr": {"min": 0.001, "max": 0.1}, "layers": {"values": [1, 2, 3]}},
}


def start(client: ApiClient, sweep_id: str, run: dict[str, Any]) -> dict[str, Any]:
    """What the child's ``init`` does with the agent's environment."""
    resume = "allow" if run["requeued"] else "never"
    return client.create_run(id=run["id"], resume=resume, sweep_id=sweep_id, config=run["params"])


def preempt(client: ApiClient, run: dict[str, Any]) -> None:
    client.mark_preempting(run["id"], run["incarnation"])
    client.finish(run["id"], run["incarnation"], 143)


def agent(api: SweepApi, sweep_id: str) -> str:
    return str(api.register_agent(sweep_id, host="test", pid=1)["id"])


def test_queue_first_oldest_first_then_search(server: ServerThread) -> None:
    client, api = server.client(), server.sweeps()
    sweep = api.create(RANDOM)["id"]
    a = agent(api, sweep)
    claimed = [api.next_run(sweep, a)["run"] for _ in range(3)]
    assert all(c is not None and not c["requeued"] for c in claimed)
    assert len({c["id"] for c in claimed}) == 3
    started = [start(client, sweep, c) for c in claimed]
    for c in claimed:
        assert 0.001 <= c["params"]["lr"] <= 0.1 and c["params"]["layers"] in (1, 2, 3)
    # preempted in the order 2, 3, 1: the queue keeps that order
    for i in (1, 2, 0):
        server.clock.advance(1)
        preempt(client, started[i])
        api.report_exit(sweep, a, started[i]["id"], 143)
    assert api.get(sweep)["queued"] == 3
    b = agent(api, sweep)
    order = []
    for _ in range(3):
        run = api.next_run(sweep, b)["run"]
        assert run["requeued"] is True and run["requeues"] == 1
        order.append(run["id"])
        assert run["params"] == next(c["params"] for c in claimed if c["id"] == run["id"])
    assert order == [claimed[1]["id"], claimed[2]["id"], claimed[0]["id"]]
    fresh = api.next_run(sweep, b)["run"]
    assert fresh["requeued"] is False and fresh["id"] not in order
    # the requeued run resumes from its last step
    resumed = start(client, sweep, {"id": order[0], "requeued": True, "params": {}})
    assert resumed["resumed"] is True and resumed["incarnation"] == 2


def test_requeue_limit_ends_a_crash_loop(server: ServerThread) -> None:
    client, api = server.client(), server.sweeps()
    sweep = api.create({**RANDOM, "max_requeues": 2, "run_cap": 2})["id"]
    a = agent(api, sweep)
    first = api.next_run(sweep, a)["run"]
    launches = 0
    run = first
    while run is not None and run["id"] == first["id"]:
        launches += 1
        preempt(client, start(client, sweep, run))
        api.report_exit(sweep, a, run["id"], 143)
        run = api.next_run(sweep, a)["run"]
    # launched once plus two requeues; the third preemption is not run again
    assert launches == 3
    assert run is not None and run["id"] != first["id"]  # the search goes on
    assert client.get_run(first["id"])["state"] == "preempted"
    assert api.get(sweep)["queued"] == 0


def test_crashed_runs_requeued_only_when_asked(server: ServerThread) -> None:
    client, api = server.client(), server.sweeps()
    for requeue_crashed in (False, True):
        sweep = api.create({**RANDOM, "requeue_crashed": requeue_crashed})["id"]
        a = agent(api, sweep)
        run = api.next_run(sweep, a)["run"]
        start(client, sweep, run)
        server.clock.advance(61)  # agent and child silent: both past the timeout
        server.reap()
        assert client.get_run(run["id"])["state"] == "crashed"
        b = agent(api, sweep)
        nxt = api.next_run(sweep, b)["run"]
        assert (nxt["id"] == run["id"]) is requeue_crashed


def test_agent_killed_mid_run_run_returns_to_queue(server: ServerThread) -> None:
    client, api = server.client(), server.sweeps()
    sweep = api.create(RANDOM)["id"]
    dead, alive = agent(api, sweep), agent(api, sweep)
    # 1. a new run the dead agent claimed but never started
    never_started = api.next_run(sweep, dead)["run"]
    # 2. a run that started, was marked preempting, then went silent with its agent
    marked = api.next_run(sweep, dead)["run"]
    started = start(client, sweep, marked)
    client.log(marked["id"], started["incarnation"], {"loss": 1.0}, step=0)
    client.mark_preempting(marked["id"], started["incarnation"])
    # the agent heartbeat also keeps its run alive: before the timeout nothing moves
    server.clock.advance(50)
    api.heartbeat(sweep, alive)
    server.reap()
    assert client.get_run(marked["id"])["state"] == "running"
    assert api.next_run(sweep, alive)["run"]["id"] not in (never_started["id"], marked["id"])
    server.clock.advance(11)
    server.reap()  # the reaper: marked and silent -> preempted -> queued
    assert client.get_run(marked["id"])["state"] == "preempted"
    got = [api.next_run(sweep, alive)["run"] for _ in range(2)]
    ids = {r["id"]: r for r in got}
    assert set(ids) == {never_started["id"], marked["id"]}
    assert ids[marked["id"]]["requeued"] is True
    assert ids[never_started["id"]]["requeued"] is False  # never ran: starts fresh
    assert ids[never_started["id"]]["params"] == never_started["params"]
    # the dead agent is told so if it comes back
    with pytest.raises(ApiConflict, match="register again"):
        api.next_run(sweep, dead)


def test_agent_heartbeat_keeps_its_run_alive(server: ServerThread) -> None:
    client, api = server.client(), server.sweeps()
    sweep = api.create(RANDOM)["id"]
    a = agent(api, sweep)
    run = api.next_run(sweep, a)["run"]
    start(client, sweep, run)  # the child creates the run, then never heartbeats
    for _ in range(3):
        server.clock.advance(40)
        api.heartbeat(sweep, a)  # the agent beats for it
        server.reap()
        assert client.get_run(run["id"])["state"] == "running"
    server.clock.advance(61)  # agent and child silent
    server.reap()
    assert client.get_run(run["id"])["state"] == "crashed"


def test_claimed_queued_run_of_dead_agent_is_released(server: ServerThread) -> None:
    client, api = server.client(), server.sweeps()
    sweep = api.create(RANDOM)["id"]
    a = agent(api, sweep)
    run = api.next_run(sweep, a)["run"]
    preempt(client, start(client, sweep, run))
    api.report_exit(sweep, a, run["id"], 143)
    dead = agent(api, sweep)
    assert api.next_run(sweep, dead)["run"]["id"] == run["id"]
    other = agent(api, sweep)
    assert api.next_run(sweep, other)["run"]["id"] != run["id"]  # claimed: not handed twice
    server.clock.advance(61)
    api.heartbeat(sweep, other)
    again = api.next_run(sweep, other)["run"]
    assert again["id"] == run["id"] and again["requeued"] is True


def test_grid_exhaustion_then_finished(server: ServerThread) -> None:
    client, api = server.client(), server.sweeps()
    sweep = api.create(
        {"method": "grid", "program": "t.py", "parameters": {"a": {"values": [1, 2, 3]}}}
    )["id"]
    a = agent(api, sweep)
    runs = [api.next_run(sweep, a)["run"] for _ in range(3)]
    assert sorted(r["params"]["a"] for r in runs) == [1, 2, 3]
    assert api.next_run(sweep, a) == {"run": None, "sweep_state": "running"}  # runs going
    for r in runs[:2]:
        live = start(client, sweep, r)
        client.finish(r["id"], live["incarnation"], 0)
        assert api.report_exit(sweep, a, r["id"], 0)["sweep_state"] == "running"
    # the last one is preempted: requeued, so the sweep is not finished
    preempt(client, start(client, sweep, runs[2]))
    assert api.report_exit(sweep, a, runs[2]["id"], 143)["sweep_state"] == "running"
    again = api.next_run(sweep, a)["run"]
    assert again["id"] == runs[2]["id"]
    live = start(client, sweep, again)
    client.finish(again["id"], live["incarnation"], 0)
    assert api.report_exit(sweep, a, again["id"], 0)["sweep_state"] == "finished"
    assert api.next_run(sweep, a) == {"run": None, "sweep_state": "finished"}
    shown = api.get(sweep)
    assert shown["state"] == "finished" and shown["runs"] == {"finished": 3}


def test_run_cap_limits_random_search(server: ServerThread) -> None:
    api = server.sweeps()
    sweep = api.create({**RANDOM, "run_cap": 2})["id"]
    a = agent(api, sweep)
    assert api.next_run(sweep, a)["run"] and api.next_run(sweep, a)["run"]
    assert api.next_run(sweep, a)["run"] is None
    assert api.get(sweep)["suggested"] == 2


def test_pause_resume_cancel(server: ServerThread) -> None:
    api = server.sweeps()
    sweep = api.create(RANDOM)["id"]
    a = agent(api, sweep)
    assert api.transition(sweep, "pause")["state"] == "paused"
    assert api.next_run(sweep, a) == {"run": None, "sweep_state": "paused"}
    with pytest.raises(ApiConflict, match="cannot pause"):
        api.transition(sweep, "pause")
    assert api.transition(sweep, "resume")["state"] == "running"
    assert api.next_run(sweep, a)["run"] is not None
    assert api.heartbeat(sweep, a) == {"sweep_state": "running", "stop": False}
    assert api.transition(sweep, "cancel")["state"] == "cancelled"
    assert api.heartbeat(sweep, a) == {"sweep_state": "cancelled", "stop": True}
    assert api.next_run(sweep, a) == {"run": None, "sweep_state": "cancelled"}
    with pytest.raises(ApiConflict, match="cannot resume"):
        api.transition(sweep, "resume")


def test_unknown_sweep_and_agent(server: ServerThread) -> None:
    api = server.sweeps()
    with pytest.raises(ApiNotFound, match="no sweep"):
        api.get("nosuchsweep")
    with pytest.raises(ApiNotFound):
        api.register_agent("nosuchsweep")
    sweep = api.create(RANDOM)["id"]
    with pytest.raises(ApiNotFound, match="no agent"):
        api.next_run(sweep, "nosuchagent")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"config": {**RANDOM, "method": "hyperband"}}, "method: must be one of"),
        (
            {"config": {**RANDOM, "parameters": {"lr": {"min": 1, "max": 0}}}},
            "parameters.lr.max: must be greater than min",
        ),
        ({"config": {**RANDOM, "metric": {"name": "x", "goal": "up"}}}, "metric.goal"),
        ({"config": {**RANDOM, "max_requeues": "ten"}}, "max_requeues"),
        (
            {"config": {"method": "bayes", "program": "t.py", "parameters": {"x": {"value": 1}}}},
            "metric: required",
        ),
        ({"config": "method: grid"}, "'config' must be an object"),
        ({"cfg": RANDOM}, "unknown field 'cfg'"),
        ({}, "'config' is required"),
    ],
)
def test_bad_sweep_files_via_the_api(server: ServerThread, body: Any, needle: str) -> None:
    client = server.client()
    with pytest.raises(ApiBadRequest, match=needle.replace("(", r"\(")) as err:
        client.request("POST", "/api/v1/sweeps", json=body)
    assert err.value.status == 400
    assert SweepApi(client).list() == []  # nothing was created


def test_sweeps_listed_and_shown(server: ServerThread) -> None:
    api = server.sweeps()
    first = api.create(RANDOM)["id"]
    server.clock.advance(1)
    second = api.create({**RANDOM, "method": "grid", "parameters": {"a": {"value": 1}}})["id"]
    assert [s["id"] for s in api.list()] == [second, first]
    shown = api.get(first)
    assert shown["method"] == "random" and shown["config"] == RANDOM
    paths = server.client().request("GET", "/api/v1/openapi.json")["paths"]
    assert "/api/v1/sweeps/{sweep_id}/agents/{agent_id}/next" in paths
