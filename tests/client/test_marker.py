"""The watcher -> marker -> server path, and `preemptwatch.mark_preempting()` by hand."""

from __future__ import annotations

from datetime import timedelta

import pytest
from tests.client.conftest import Server, new_id, wait_for

import preemptwatch
from preemptwatch import marks
from preemptwatch.client.api import ApiClient
from preemptwatch.notice import Notice, utcnow
from preemptwatch.watcher import Watcher


def test_a_notice_marks_the_active_run_on_the_server(env_server: Server) -> None:
    run = preemptwatch.init(id=new_id())
    api = ApiClient()
    watcher = Watcher([]).start_in_thread()
    try:
        notice = Notice("ec2", "terminate", deadline=utcnow() + timedelta(seconds=120))
        watcher.notice_threadsafe(notice)
        wait_for(lambda: api.get_run(run.id)["preempting"], timeout=15)
    finally:
        watcher.stop()
    assert run.preempting
    run.finish(143)
    assert api.get_run(run.id)["state"] == "preempted"
    assert run._on_notice not in marks.markers()  # unregistered on finish


def test_mark_preempting_by_hand(env_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    assert preemptwatch.mark_preempting() is False  # no active run: a warning, no error
    assert "no active run" in caplog.text
    run = preemptwatch.init(id=new_id())
    assert preemptwatch.mark_preempting() is True
    assert ApiClient().get_run(run.id)["preempting"] is True
    assert run.preempting
