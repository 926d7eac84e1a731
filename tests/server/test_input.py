"""Bad input gets a clear 400/413 naming the field and changes nothing; auth and project
isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from preemptwatch.server.testing import InProcessServer

from .conftest import Api

BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("/api/v1/runs", {"id": "r2", "colour": "red"}, "colour"),
    ("/api/v1/runs", {"id": 5}, "id"),
    ("/api/v1/runs", {"id": "r2", "config": [1, 2]}, "config"),
    ("/api/v1/runs", {"id": "r2", "resume": "sometimes"}, "resume"),
    ("/api/v1/runs", {"id": "r2", "resume": True}, "resume"),
    ("/api/v1/runs", {"id": "r2", "sweep_id": "s" * 65}, "sweep_id"),
    ("/api/v1/runs/r1/heartbeat", {}, "incarnation"),
    ("/api/v1/runs/r1/heartbeat", {"incarnation": "1"}, "incarnation"),
    ("/api/v1/runs/r1/heartbeat", {"incarnation": True}, "incarnation"),
    ("/api/v1/runs/r1/log", {"incarnation": 1}, "data"),
    ("/api/v1/runs/r1/log", {"incarnation": 1, "data": {}, "step": -1}, "step"),
    ("/api/v1/runs/r1/log", {"incarnation": 1, "data": {}, "step": 1.5}, "step"),
    ("/api/v1/runs/r1/log", {"incarnation": 1, "data": {}, "stpe": 1}, "stpe"),
    ("/api/v1/runs/r1/finish", {"incarnation": 1}, "exit_code"),
    ("/api/v1/runs/r1/finish", {"incarnation": 1, "exit_code": "0"}, "exit_code"),
    ("/api/v1/runs/r1/preempting", {"incarnation": 1, "notice": 3}, "notice"),
]


async def test_bad_fields_are_400_naming_the_field(api: Api) -> None:
    await api.create("r1")
    before = await api.run("r1")
    for path, body, field in BAD_FIELDS:
        status, answer = await api.post(path, body)
        assert status == 400, (body, answer)
        assert answer["error"] == "bad_request" and answer["field"] == field, (body, answer)
        assert field in answer["message"]
    assert await api.run("r1") == before
    assert (await api.get("/api/v1/runs"))[1]["runs"] == [before]


async def test_malformed_bodies_are_400(api: Api) -> None:
    for raw in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"null"):
        status, answer = await api.request(
            "POST", "/api/v1/runs", data=raw, headers={"Content-Type": "application/json"}
        )
        assert status == 400 and answer["error"] == "bad_request", answer
    assert (await api.get("/api/v1/runs"))[1]["runs"] == []


async def test_json_bodies_over_the_limit_are_413(api: Api) -> None:
    big = {"id": "r1", "config": {"blob": "x" * (1024 * 1024)}}
    status, answer = await api.post("/api/v1/runs", big)
    assert status == 413 and answer["error"] == "too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted on reading
        yield b'{"id": "r1", "config": {"blob": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}}'

    status, answer = await api.request("POST", "/api/v1/runs", data=chunked())
    assert status == 413 and answer["error"] == "too_large"
    assert (await api.get("/api/v1/runs"))[1]["runs"] == []


async def test_unknown_runs_and_routes_are_404(api: Api) -> None:
    for path in ("/api/v1/runs/nope", "/api/v1/runs/nope/files", "/api/v1/nothing"):
        status, answer = await api.get(path)
        assert status == 404 and answer["error"] == "not_found", path
    for path in ("heartbeat", "preempting"):
        assert (await api.post(f"/api/v1/runs/nope/{path}", {"incarnation": 1}))[0] == 404
    assert (await api.post("/api/v1/runs/nope/finish", {"incarnation": 1, "exit_code": 0}))[
        0
    ] == 404


async def test_missing_or_wrong_key_is_401(api: Api) -> None:
    await api.create("r1")
    for key in (None, "wrong-key"):
        other = api.as_key(key)
        for method, path, body in [
            ("GET", "/api/v1/runs", None),
            ("GET", "/api/v1/runs/r1", None),
            ("POST", "/api/v1/runs", {"id": "x"}),
            ("POST", "/api/v1/runs/r1/heartbeat", {"incarnation": 1}),
        ]:
            status, answer = await other.request(method, path, json=body)
            assert status == 401 and answer["error"] == "unauthorized", (key, path)
    status, _ = await api.request("GET", "/api/v1/runs", headers={"Authorization": "Basic x"})
    assert status == 401


async def test_public_endpoints_need_no_key(api: Api) -> None:
    anonymous = api.as_key(None)
    status, health = await anonymous.get("/healthz")
    assert status == 200 and health == {"status": "ok"}
    status, doc = await anonymous.get("/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "/api/v1/runs/{run_id}/heartbeat" in doc["paths"]
    status, text = await anonymous.get("/metrics")
    assert status == 200 and b"preemptwatch_http_requests_total" in text


async def test_projects_are_isolated(api: Api, app_server: InProcessServer) -> None:
    other_key = await app_server.ctx.store.create_key("other")
    other = api.as_key(other_key)
    await api.create("shared-name", instance_id="i-1")
    # another project sees nothing of it
    assert (await other.get("/api/v1/runs/shared-name"))[0] == 404
    assert (await other.get("/api/v1/runs"))[1]["runs"] == []
    assert (await other.post("/api/v1/runs/shared-name/heartbeat", {"incarnation": 1}))[0] == 404
    assert (await other.post("/api/v1/instances/i-1/preempting", {}))[1] == {"marked": []}
    assert (await other.post("/api/v1/runs", {"id": "shared-name", "resume": "must"}))[0] == 404
    # and may use the same run ID for a run of its own
    status, run = await other.post("/api/v1/runs", {"id": "shared-name"})
    assert status == 201 and run["project"] == "other"
    assert (await api.run("shared-name"))["project"] == "default"
    assert (await api.run("shared-name"))["preempting"] is False
