"""Every row of the resume table, run-ID rules, and refusing to resume a live run."""

from __future__ import annotations

from urllib.parse import quote

from preemptwatch.server.testing import ManualClock

from .conftest import TIMEOUT, Api


async def test_never_creates_a_new_run(api: Api) -> None:
    status, run = await api.post(
        "/api/v1/runs", {"id": "r1", "resume": "never", "config": {"a": 1}}
    )
    assert status == 201
    assert run["id"] == "r1" and run["state"] == "running" and run["incarnation"] == 1
    assert run["resumed"] is False and run["step"] == -1 and run["config"] == {"a": 1}
    assert run["project"] == "default" and run["heartbeat_timeout"] == TIMEOUT


async def test_never_is_the_default_and_refuses_an_existing_run(api: Api) -> None:
    await api.create("r1")
    status, body = await api.post("/api/v1/runs", {"id": "r1"})
    assert status == 409 and body["error"] == "conflict"
    assert (await api.run("r1"))["incarnation"] == 1  # nothing changed


async def test_must_resumes_an_existing_run_from_its_last_step(api: Api) -> None:
    run = await api.create("r1")
    for step in range(5):
        await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "step": step, "data": {"x": step}})
    await api.post("/api/v1/runs/r1/finish", {"incarnation": run["incarnation"], "exit_code": 1})
    status, resumed = await api.post("/api/v1/runs", {"id": "r1", "resume": "must"})
    assert status == 200
    assert resumed["resumed"] is True and resumed["step"] == 4 and resumed["incarnation"] == 2
    assert resumed["state"] == "running" and resumed["exit_code"] is None
    assert resumed["ended_at"] is None


async def test_must_refuses_an_unknown_run(api: Api) -> None:
    status, body = await api.post("/api/v1/runs", {"id": "nope", "resume": "must"})
    assert status == 404 and body["error"] == "not_found"
    status, _ = await api.get("/api/v1/runs/nope")
    assert status == 404  # and nothing was created


async def test_allow_resumes_an_existing_run(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/log", {"incarnation": 1, "data": {"x": 1}})
    await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 0})
    status, run = await api.post("/api/v1/runs", {"id": "r1", "resume": "allow"})
    assert status == 200 and run["resumed"] is True and run["step"] == 0
    assert run["incarnation"] == 2


async def test_allow_creates_an_unknown_run(api: Api) -> None:
    status, run = await api.post("/api/v1/runs", {"id": "new", "resume": "allow"})
    assert status == 201 and run["resumed"] is False and run["incarnation"] == 1


async def test_auto_is_refused_because_the_client_resolves_it(api: Api) -> None:
    status, body = await api.post("/api/v1/runs", {"id": "r1", "resume": "auto"})
    assert status == 400 and body["field"] == "resume"


async def test_resuming_a_live_run_is_refused(api: Api) -> None:
    await api.create("r1")
    status, body = await api.post("/api/v1/runs", {"id": "r1", "resume": "allow"})
    assert status == 409 and body["error"] == "conflict" and "still running" in body["message"]
    assert (await api.run("r1"))["incarnation"] == 1


async def test_a_run_marked_preempting_may_be_resumed_at_once(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    status, run = await api.post("/api/v1/runs", {"id": "r1", "resume": "must"})
    assert status == 200 and run["incarnation"] == 2
    assert run["preempting"] is False  # the new incarnation starts unmarked


async def test_a_stale_run_may_be_resumed(api: Api, clock: ManualClock) -> None:
    await api.create("r1")
    clock.advance(TIMEOUT - 1)
    assert (await api.post("/api/v1/runs", {"id": "r1", "resume": "allow"}))[0] == 409
    clock.advance(2)
    status, run = await api.post("/api/v1/runs", {"id": "r1", "resume": "allow"})
    assert status == 200 and run["incarnation"] == 2


async def test_heartbeats_keep_a_run_from_being_resumed(api: Api, clock: ManualClock) -> None:
    await api.create("r1")
    for _ in range(3):
        clock.advance(TIMEOUT - 1)
        status, beat = await api.post("/api/v1/runs/r1/heartbeat", {"incarnation": 1})
        assert status == 200 and beat == {"state": "running", "preempting": False}
    assert (await api.post("/api/v1/runs", {"id": "r1", "resume": "allow"}))[0] == 409


async def test_run_ids_are_normalised_and_limited(api: Api) -> None:
    run = await api.create("my run/v2.0")
    assert run["id"] == "my-run-v2-0"
    # paths normalise the same way
    assert (await api.run(quote("my run/v2.0", safe="")))["id"] == "my-run-v2-0"
    assert (await api.create("x" * 64))["id"] == "x" * 64
    for bad in ("x" * 65, ""):
        status, body = await api.post("/api/v1/runs", {"id": bad})
        assert status == 400 and body["field"] == "id", body


async def test_without_an_id_the_server_generates_one(api: Api) -> None:
    ids = {(await api.create())["id"] for _ in range(5)}
    assert len(ids) == 5
    assert all(len(i) == 8 and i.isalnum() and i == i.lower() for i in ids)


async def test_resume_records_the_new_instance_and_keeps_the_config(api: Api) -> None:
    await api.create("r1", config={"lr": 0.1}, instance_id="i-1", host="a", sweep_id="s1")
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    run = await api.create("r1", resume="must", instance_id="i-2", host="b")
    assert run["instance_id"] == "i-2" and run["host"] == "b"
    assert run["config"] == {"lr": 0.1} and run["sweep_id"] == "s1"


async def test_list_runs_newest_first_with_filters(api: Api, clock: ManualClock) -> None:
    for i in range(4):
        await api.create(f"r{i}", instance_id="i-a" if i % 2 else "i-b")
        clock.advance(1)
    await api.post("/api/v1/runs/r3/finish", {"incarnation": 1, "exit_code": 0})
    status, body = await api.get("/api/v1/runs")
    assert status == 200 and [r["id"] for r in body["runs"]] == ["r3", "r2", "r1", "r0"]
    _, body = await api.get("/api/v1/runs?state=running&instance_id=i-a")
    assert [r["id"] for r in body["runs"]] == ["r1"]
    _, body = await api.get("/api/v1/runs?limit=2")
    assert len(body["runs"]) == 2
    assert (await api.get("/api/v1/runs?state=bogus"))[0] == 400
    assert (await api.get("/api/v1/runs?limit=0"))[0] == 400
