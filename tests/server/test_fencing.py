"""Fencing: writes from an older incarnation get 409 stale_incarnation and change nothing."""

from __future__ import annotations

from .conftest import Api


async def _two_incarnations(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "step": 3, "data": {"x": 1}})
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    await api.create("r1", resume="must")  # incarnation 2 takes over; 1 is now a zombie


async def test_every_write_of_a_zombie_is_refused_and_changes_nothing(api: Api) -> None:
    await _two_incarnations(api)
    before = await api.run("r1")
    writes = [
        ("/api/v1/runs/r1/heartbeat", {"incarnation": 1}),
        ("/api/v1/runs/r1/log", {"incarnation": 1, "step": 9, "data": {"x": 2}}),
        ("/api/v1/runs/r1/preempting", {"incarnation": 1}),
        ("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 0}),
    ]
    for path, body in writes:
        status, answer = await api.post(path, body)
        assert status == 409 and answer["error"] == "stale_incarnation", (path, answer)
    status, answer = await api.request(
        "PUT", "/api/v1/runs/r1/files/ckpt.pt?incarnation=1", data=b"zombie"
    )
    assert status == 409 and answer["error"] == "stale_incarnation"
    after = await api.run("r1")
    assert after == before
    assert after["state"] == "running" and after["step"] == 3 and not after["preempting"]
    _, history = await api.get("/api/v1/runs/r1/history")
    assert [h["step"] for h in history["history"]] == [3]
    _, listing = await api.get("/api/v1/runs/r1/files")
    assert listing["files"] == []


async def test_the_current_incarnation_writes_normally(api: Api) -> None:
    await _two_incarnations(api)
    assert (await api.post("/api/v1/runs/r1/heartbeat", {"incarnation": 2}))[0] == 200
    status, body = await api.post("/api/v1/runs/r1/log", {"incarnation": 2, "data": {"y": 1}})
    assert status == 200 and body == {"step": 4}
    _, history = await api.get("/api/v1/runs/r1/history")
    assert [(h["step"], h["incarnation"]) for h in history["history"]] == [(3, 1), (4, 2)]


async def test_a_future_incarnation_is_refused_too(api: Api) -> None:
    await api.create("r1")
    status, body = await api.post("/api/v1/runs/r1/heartbeat", {"incarnation": 7})
    assert status == 409 and body["error"] == "stale_incarnation"


async def test_heartbeat_of_an_ended_run_reports_its_state(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 1})
    status, body = await api.post("/api/v1/runs/r1/heartbeat", {"incarnation": 1})
    assert status == 200 and body == {"state": "preempted", "preempting": True}


async def test_heartbeat_reports_a_mark_made_elsewhere(api: Api) -> None:
    await api.create("r1", instance_id="i-9")
    await api.post("/api/v1/instances/i-9/preempting", {})
    status, body = await api.post("/api/v1/runs/r1/heartbeat", {"incarnation": 1})
    assert status == 200 and body == {"state": "running", "preempting": True}


async def test_concurrent_heartbeats_are_batched_and_all_answered(api: Api) -> None:
    import asyncio

    for i in range(20):
        await api.create(f"r{i}")
    await api.create("old")
    await api.post("/api/v1/runs/old/preempting", {"incarnation": 1})
    await api.create("old", resume="must")
    calls = [api.post(f"/api/v1/runs/r{i % 20}/heartbeat", {"incarnation": 1}) for i in range(200)]
    calls.append(api.post("/api/v1/runs/old/heartbeat", {"incarnation": 1}))
    calls.append(api.post("/api/v1/runs/missing/heartbeat", {"incarnation": 1}))
    answers = await asyncio.gather(*calls)
    assert [s for s, _ in answers[:200]] == [200] * 200
    assert answers[200][0] == 409 and answers[200][1]["error"] == "stale_incarnation"
    assert answers[201][0] == 404
