"""Logging: history is kept, the step never goes backwards, the same step merges."""

from __future__ import annotations

from preemptwatch.server.testing import ManualClock

from .conftest import TIMEOUT, Api


async def test_steps_append_and_history_is_ordered(api: Api) -> None:
    await api.create("r1")
    steps = []
    for i in range(3):
        status, body = await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "data": {"i": i}})
        assert status == 200
        steps.append(body["step"])
    assert steps == [0, 1, 2]
    status, body = await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "step": 10, "data": {}})
    assert body == {"step": 10}
    _, body = await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "data": {"i": 11}})
    assert body == {"step": 11}
    status, hist = await api.get("/api/v1/runs/r1/history")
    assert status == 200
    assert [(h["step"], h["data"]) for h in hist["history"]] == [
        (0, {"i": 0}),
        (1, {"i": 1}),
        (2, {"i": 2}),
        (10, {}),
        (11, {"i": 11}),
    ]
    assert all(h["incarnation"] == 1 and h["time"].endswith("Z") for h in hist["history"])
    assert (await api.run("r1"))["step"] == 11


async def test_a_step_below_the_last_is_refused(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "step": 5, "data": {"a": 1}})
    status, body = await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "step": 4, "data": {}})
    assert status == 409 and body["error"] == "conflict" and "backwards" in body["message"]
    _, hist = await api.get("/api/v1/runs/r1/history")
    assert [h["step"] for h in hist["history"]] == [5]


async def test_the_same_step_merges(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "step": 2, "data": {"a": 1, "b": 1}})
    status, body = await api.post(
        "/api/v1/runs/r1/log", {"incarnation": 1, "step": 2, "data": {"b": 2, "c": 3}}
    )
    assert status == 200 and body == {"step": 2}
    _, hist = await api.get("/api/v1/runs/r1/history")
    assert hist["history"][0]["data"] == {"a": 1, "b": 2, "c": 3}


async def test_logging_counts_as_a_heartbeat(api: Api, clock: ManualClock) -> None:
    await api.create("r1")
    clock.advance(TIMEOUT - 1)
    await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "data": {}})
    clock.advance(TIMEOUT - 1)
    assert (await api.post("/api/v1/runs", {"id": "r1", "resume": "allow"}))[0] == 409


async def test_logging_to_an_ended_run_is_refused(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 0})
    status, body = await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "data": {}})
    assert status == 409 and "ended" in body["message"]


async def test_history_of_an_unknown_run_is_404(api: Api) -> None:
    assert (await api.get("/api/v1/runs/nope/history"))[0] == 404
    assert (await api.post("/api/v1/runs/nope/log", {"incarnation": 1, "data": {}}))[0] == 404
