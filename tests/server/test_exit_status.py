"""Every row of the exit-status table, and the sweep run queue it feeds."""

from __future__ import annotations

from preemptwatch.server.testing import InProcessServer, ManualClock

from .conftest import TIMEOUT, Api


async def _queue(server: InProcessServer, sweep_id: str) -> list[str]:
    project = await server.ctx.store.project_for_key(server.api_key)
    assert project is not None
    return await server.ctx.store.queued_runs(project.id, sweep_id)


async def _sweep(server: InProcessServer, sweep_id: str, **config: object) -> None:
    project = await server.ctx.store.project_for_key(server.api_key)
    assert project is not None
    await server.ctx.store.create_sweep(project.id, sweep_id, config)


async def test_exit_code_zero_is_finished_even_when_marked(
    api: Api, app_server: InProcessServer
) -> None:
    await api.create("r1", sweep_id="s1")
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    status, run = await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 0})
    assert status == 200 and run["state"] == "finished" and run["exit_code"] == 0
    assert run["ended_at"] is not None and run["requeues"] == 0
    assert await _queue(app_server, "s1") == []


async def test_nonzero_after_a_mark_is_preempted_and_requeued(
    api: Api, app_server: InProcessServer
) -> None:
    await api.create("r1", sweep_id="s1")
    await api.create("r2", sweep_id="s1")
    for run_id in ("r2", "r1"):
        await api.post(f"/api/v1/runs/{run_id}/preempting", {"incarnation": 1})
        status, run = await api.post(
            f"/api/v1/runs/{run_id}/finish", {"incarnation": 1, "exit_code": 143}
        )
        assert status == 200 and run["state"] == "preempted" and run["requeues"] == 1
    assert await _queue(app_server, "s1") == ["r2", "r1"]  # in order
    assert (await api.run("r1"))["requeues"] == 1


async def test_nonzero_without_a_mark_is_failed_and_not_requeued(
    api: Api, app_server: InProcessServer
) -> None:
    await api.create("r1", sweep_id="s1")
    status, run = await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 1})
    assert status == 200 and run["state"] == "failed" and run["requeues"] == 0
    assert await _queue(app_server, "s1") == []


async def test_preempted_run_outside_a_sweep_is_not_queued(
    api: Api, app_server: InProcessServer
) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    _, run = await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 1})
    assert run["state"] == "preempted" and run["requeues"] == 0


async def test_silent_marked_run_is_reaped_preempted_and_requeued(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    await api.create("r1", sweep_id="s1")
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    clock.advance(TIMEOUT + 1)
    result = await app_server.reap()
    assert len(result.preempted) == 1 and result.crashed == []
    run = await api.run("r1")
    assert run["state"] == "preempted" and run["exit_code"] is None and run["requeues"] == 1
    assert await _queue(app_server, "s1") == ["r1"]


async def test_silent_unmarked_run_is_reaped_crashed_and_not_requeued(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    await _sweep(app_server, "s1", method="grid")
    await api.create("r1", sweep_id="s1")
    clock.advance(TIMEOUT + 1)
    result = await app_server.reap()
    assert len(result.crashed) == 1 and result.queued == []
    assert (await api.run("r1"))["state"] == "crashed"
    assert await _queue(app_server, "s1") == []


async def test_crashed_run_is_requeued_where_the_sweep_asks(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    await _sweep(app_server, "yes", requeue_crashed=True)
    await _sweep(app_server, "no", requeue_crashed=False)
    await api.create("a", sweep_id="yes")
    await api.create("b", sweep_id="no")
    clock.advance(TIMEOUT + 1)
    result = await app_server.reap()
    assert len(result.crashed) == 2
    assert await _queue(app_server, "yes") == ["a"] and await _queue(app_server, "no") == []
    assert (await api.run("a"))["requeues"] == 1 and (await api.run("b"))["requeues"] == 0


async def test_finishing_an_ended_run_is_a_conflict(api: Api) -> None:
    await api.create("r1")
    await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 0})
    status, body = await api.post("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": 1})
    assert status == 409 and body["error"] == "conflict"
    assert (await api.run("r1"))["state"] == "finished"


async def test_a_requeued_run_resumes_and_counts_requeues(
    api: Api, app_server: InProcessServer
) -> None:
    await api.create("r1", sweep_id="s1")
    for incarnation in (1, 2):
        await api.post("/api/v1/runs/r1/preempting", {"incarnation": incarnation})
        await api.post("/api/v1/runs/r1/finish", {"incarnation": incarnation, "exit_code": 1})
        run = await api.create("r1", resume="allow")
    assert run["incarnation"] == 3 and run["requeues"] == 2
    assert await _queue(app_server, "s1") == ["r1", "r1"]


async def test_a_late_mark_turns_a_crashed_run_into_a_preempted_one(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    await _sweep(app_server, "s1", requeue_crashed=False)
    await _sweep(app_server, "s2", requeue_crashed=True)
    await api.create("r1", sweep_id="s1")
    await api.create("r2", sweep_id="s2")
    clock.advance(TIMEOUT + 1)
    await app_server.reap()
    assert await _queue(app_server, "s2") == ["r2"]  # crashed, queued by its sweep's wish
    notice = {"source": "ec2", "kind": "terminate"}
    for run_id in ("r1", "r2"):  # the spooled marks arrive after the reaper's verdict
        status, run = await api.post(
            f"/api/v1/runs/{run_id}/preempting", {"incarnation": 1, "notice": notice}
        )
        assert status == 200 and run["state"] == "preempted" and run["notice"] == notice
        assert run["requeues"] == 1
    assert await _queue(app_server, "s1") == ["r1"]
    assert await _queue(app_server, "s2") == ["r2"]  # queued once, not twice
    # a mark for a run that ended otherwise changes nothing
    await api.create("r3")
    await api.post("/api/v1/runs/r3/finish", {"incarnation": 1, "exit_code": 1})
    _, run = await api.post("/api/v1/runs/r3/preempting", {"incarnation": 1})
    assert run["state"] == "failed" and run["preempting"] is False
