"""Single HTTP exchanges of `ApiClient` against a scripted server: statuses, retries,
errors, and the spool's delivery rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.client.conftest import Reply, ScriptedServer
from tests.conftest import free_port

from preemptwatch.client.api import ApiClient
from preemptwatch.client.spool import deliver_spool, spool_mark, spooled_marks
from preemptwatch.errors import (
    ApiBadRequest,
    ApiConflict,
    ApiNotFound,
    ApiStaleIncarnation,
    ApiUnauthorized,
    ApiUnavailable,
)

RUN = "/api/v1/runs/r1"


def client(srv: ScriptedServer, budget: float = 3.0) -> ApiClient:
    return ApiClient(srv.url, "secret", timeout=2.0, retry_budget=budget)


def test_sends_the_key_and_decodes_json(scripted: ScriptedServer) -> None:
    scripted.script("GET", RUN, Reply(200, {"id": "r1", "state": "running"}))
    assert client(scripted).get_run("r1") == {"id": "r1", "state": "running"}
    ((headers, _),) = scripted.calls("GET", RUN)
    assert headers["Authorization"] == "Bearer secret"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "bad_request", ApiBadRequest),
        (401, "unauthorized", ApiUnauthorized),
        (404, "not_found", ApiNotFound),
        (409, "conflict", ApiConflict),
        (409, "stale_incarnation", ApiStaleIncarnation),
    ],
)
def test_4xx_is_final_and_carries_the_servers_message(
    scripted: ScriptedServer, status: int, code: str, cls: type
) -> None:
    scripted.script(
        "POST",
        f"{RUN}/heartbeat",
        Reply(status, {"error": code, "message": "why"}),
        Reply(200, {"state": "running", "preempting": False}),
    )
    with pytest.raises(cls) as info:
        client(scripted).heartbeat("r1", 1)
    assert (info.value.status, info.value.code, info.value.message) == (status, code, "why")
    assert len(scripted.calls("POST", f"{RUN}/heartbeat")) == 1


def test_5xx_and_dropped_connections_are_retried(scripted: ScriptedServer) -> None:
    scripted.script(
        "POST",
        f"{RUN}/heartbeat",
        Reply(503, "busy"),
        Reply(drop=True),
        Reply(200, {"state": "running", "preempting": True}),
    )
    assert client(scripted).heartbeat("r1", 1) == {"state": "running", "preempting": True}
    bodies = [json.loads(b) for _, b in scripted.calls("POST", f"{RUN}/heartbeat")]
    assert bodies == [{"incarnation": 1}] * 3


def test_gives_up_after_the_retry_budget(scripted: ScriptedServer) -> None:
    scripted.script("GET", RUN, Reply(502, "bad gateway"))
    with pytest.raises(ApiUnavailable, match="bad gateway") as info:
        client(scripted, budget=0.5).get_run("r1")
    assert info.value.status == 502
    assert len(scripted.calls("GET", RUN)) >= 2


def test_unreachable_server_is_unavailable() -> None:
    api = ApiClient(f"http://127.0.0.1:{free_port()}", "k", retry_budget=0.3)
    with pytest.raises(ApiUnavailable, match="cannot reach the server"):
        api.get_run("r1")


def test_run_ids_are_normalised_before_sending(scripted: ScriptedServer) -> None:
    scripted.script("POST", "/api/v1/runs", Reply(201, {"id": "my-run"}))
    client(scripted).create_run(id="my run", resume="allow")
    ((_, body),) = scripted.calls("POST", "/api/v1/runs")
    assert json.loads(body) == {"id": "my-run", "resume": "allow"}


def test_deliver_spool_removes_taken_and_refused_marks_keeps_the_rest(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    taken = spool_mark(scripted.url, "r1", 1, {"source": "ec2", "kind": "terminate"}, spool)
    refused = spool_mark(scripted.url, "gone", 1, None, spool)
    other = spool_mark("http://elsewhere:1", "r9", 1, None, spool)
    scripted.script("POST", f"{RUN}/preempting", Reply(200, {"id": "r1", "preempting": True}))
    scripted.script(
        "POST",
        "/api/v1/runs/gone/preempting",
        Reply(404, {"error": "not_found", "message": "no run gone"}),
    )
    assert deliver_spool(client(scripted), spool) == 1
    ((_, body),) = scripted.calls("POST", f"{RUN}/preempting")
    assert json.loads(body) == {
        "incarnation": 1,
        "notice": {"source": "ec2", "kind": "terminate"},
    }
    assert not taken.exists() and not refused.exists()
    assert spooled_marks(spool) == [other]


def test_deliver_spool_keeps_marks_while_the_server_is_away(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    server = f"http://127.0.0.1:{free_port()}"
    first = spool_mark(server, "r1", 1, None, spool)
    (spool / "run-mark-0-broken.json").write_text("{not json")
    assert deliver_spool(ApiClient(server, "k"), spool, budget=0.2) == 0
    assert first.exists()
    assert (spool / "run-mark-0-broken.json").exists()  # unreadable: reported, left alone
