"""The server goes away mid-run: training is not held up and no log entry is lost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.client.conftest import new_id, start_server, stop_server

import preemptwatch
from preemptwatch.client.api import ApiClient


def test_logs_wait_for_the_server_without_blocking_training(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = start_server(db_url, tmp_path / "srv")
    port = int(srv.url.rsplit(":", 1)[1])
    monkeypatch.setenv("PREEMPTWATCH_SERVER", srv.url)
    monkeypatch.setenv("PREEMPTWATCH_API_KEY", srv.api_key)
    run = preemptwatch.init(id=new_id("outage"), heartbeat_interval=0.2)
    run.log({"loss": 1.0})
    assert run.flush(10)
    stop_server(srv)
    try:
        started = time.monotonic()
        for i in range(1, 51):
            run.log({"loss": 1.0 / (i + 1)})
        assert time.monotonic() - started < 0.5  # log() never waits for the server
        assert not run.flush(0.5)  # ...the entries wait in the queue
        srv = start_server(db_url, tmp_path / "srv", port=port)
        assert run.flush(30)
        history = ApiClient().history(run.id)
        assert [h["step"] for h in history] == list(range(51))
        run.finish(0)
        assert ApiClient().get_run(run.id)["state"] == "finished"
    finally:
        stop_server(srv)
