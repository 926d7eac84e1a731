"""Instance mapping: marking every running run of an instance preempting."""

from __future__ import annotations

from .conftest import Api


async def test_marks_every_running_run_of_the_instance(api: Api) -> None:
    await api.create("a", instance_id="i-1", host="node1")
    await api.create("b", instance_id="i-1")
    await api.create("c", instance_id="i-2")
    await api.create("done", instance_id="i-1")
    await api.post("/api/v1/runs/done/finish", {"incarnation": 1, "exit_code": 0})
    notice = {"source": "ec2", "kind": "terminate"}
    status, body = await api.post("/api/v1/instances/i-1/preempting", {"notice": notice})
    assert status == 200 and body == {"marked": ["a", "b"]}
    a = await api.run("a")
    assert a["preempting"] is True and a["notice"] == notice and a["host"] == "node1"
    assert (await api.run("c"))["preempting"] is False
    assert (await api.run("done"))["preempting"] is False
    # idempotent, and an instance without runs marks nothing
    assert (await api.post("/api/v1/instances/i-1/preempting"))[1] == {"marked": ["a", "b"]}
    assert (await api.post("/api/v1/instances/i-404/preempting", {}))[1] == {"marked": []}


async def test_a_marked_run_ends_preempted(api: Api) -> None:
    await api.create("a", instance_id="i-1")
    await api.post("/api/v1/instances/i-1/preempting", {})
    _, run = await api.post("/api/v1/runs/a/finish", {"incarnation": 1, "exit_code": 143})
    assert run["state"] == "preempted"


async def test_mark_preempting_is_idempotent_and_keeps_the_notice(api: Api) -> None:
    await api.create("a")
    notice = {"source": "gcp", "kind": "preempt"}
    _, first = await api.post("/api/v1/runs/a/preempting", {"incarnation": 1, "notice": notice})
    status, second = await api.post("/api/v1/runs/a/preempting", {"incarnation": 1})
    assert status == 200 and second["preempting"] and second["notice"] == notice
    assert first["preempting"] is True


async def test_bad_notice_is_refused(api: Api) -> None:
    status, body = await api.post("/api/v1/instances/i-1/preempting", {"notice": "soon"})
    assert status == 400 and body["field"] == "notice"
