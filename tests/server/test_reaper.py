"""The reaper with a controlled clock: only stale runs, each once, in batches, via the
partial index."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from preemptwatch.server.testing import InProcessServer, ManualClock

from .conftest import TIMEOUT, Api


async def test_only_stale_runs_are_reaped_and_only_once(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    for i in range(10):
        await api.create(f"old{i}")
    clock.advance(TIMEOUT / 2)
    for i in range(5):
        await api.create(f"new{i}")
    for i in range(3):  # these keep beating
        await api.post(f"/api/v1/runs/old{i}/heartbeat", {"incarnation": 1})
    await api.create("done")
    await api.post("/api/v1/runs/done/finish", {"incarnation": 1, "exit_code": 0})
    clock.advance(TIMEOUT / 2 + 1)
    result = await app_server.reap()
    assert sorted(r for _, r in result.crashed) == [f"old{i}" for i in range(3, 10)]
    assert (await app_server.reap()).reaped == 0
    _, body = await api.get("/api/v1/runs?state=running")
    assert sorted(r["id"] for r in body["runs"]) == [
        "new0",
        "new1",
        "new2",
        "new3",
        "new4",
        "old0",
        "old1",
        "old2",
    ]
    crashed = await api.run("old5")
    assert crashed["state"] == "crashed" and crashed["ended_at"] is not None
    assert (await api.run("done"))["state"] == "finished"


async def test_exactly_at_the_timeout_is_not_stale(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    await api.create("r1")
    clock.advance(TIMEOUT)
    assert (await app_server.reap()).reaped == 0
    clock.advance(0.01)
    assert (await app_server.reap()).reaped == 1


async def test_large_passes_run_in_batches(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    for i in range(25):
        await api.create(f"r{i}", sweep_id="s1")
        if i % 2:
            await api.post(f"/api/v1/runs/r{i}/preempting", {"incarnation": 1})
    clock.advance(TIMEOUT + 1)
    result = await app_server.ctx.store.reap(batch=7)
    assert result.reaped == 25 and len(result.preempted) == 12 and len(result.queued) == 12
    project = await app_server.ctx.store.project_for_key(app_server.api_key)
    assert project is not None
    queue = await app_server.ctx.store.queued_runs(project.id, "s1")
    assert sorted(queue) == sorted(f"r{i}" for i in range(25) if i % 2)


async def test_concurrent_passes_reap_each_run_once(
    api: Api, app_server: InProcessServer, clock: ManualClock
) -> None:
    for i in range(30):
        await api.create(f"r{i}", sweep_id="s1")
        await api.post(f"/api/v1/runs/r{i}/preempting", {"incarnation": 1})
    clock.advance(TIMEOUT + 1)
    results = await asyncio.gather(*(app_server.ctx.store.reap(batch=4) for _ in range(4)))
    reaped = [r for result in results for _, r in result.preempted]
    assert sorted(reaped) == sorted(f"r{i}" for i in range(30))
    project = await app_server.ctx.store.project_for_key(app_server.api_key)
    assert project is not None
    assert sorted(await app_server.ctx.store.queued_runs(project.id, "s1")) == sorted(reaped)


async def test_the_stale_run_query_uses_the_partial_index(app_server: InProcessServer) -> None:
    db = app_server.ctx.db
    query = (
        "SELECT project_id, id FROM runs WHERE state = 'running' AND heartbeat_at < 5 "
        "ORDER BY heartbeat_at LIMIT 1000"
    )
    async with db.read() as conn:
        if db.sqlite:
            rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query)
        else:
            await conn.execute(sa.text("SET enable_seqscan = off"))
            rows = await conn.exec_driver_sql("EXPLAIN " + query)
        plan = " ".join(str(r[-1]) for r in rows)
    assert "ix_runs_running_heartbeat" in plan, plan
