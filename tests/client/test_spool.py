"""Never lose a mark: spooled while the server is down, delivered by the next client."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.client.conftest import new_id, start_server, stop_server

import preemptwatch
from preemptwatch.client.api import ApiClient
from preemptwatch.client.spool import spooled_marks
from preemptwatch.errors import ApiConflict

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from datetime import timedelta
    import preemptwatch
    from preemptwatch.notice import Notice, utcnow

    run = preemptwatch.init(id=sys.argv[1])
    run.log({"loss": 1.0})
    run.flush()
    print("ready", flush=True)
    sys.stdin.readline()  # the test stops the server meanwhile
    notice = Notice("gcp", "preempt", deadline=utcnow() + timedelta(seconds=2))
    print("marked" if run.mark_preempting(notice) else "spooled", flush=True)
    os._exit(137)  # dies without finishing, as a preempted VM does
    """
)


def test_a_mark_the_server_missed_is_delivered_by_the_next_client(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = start_server(db_url, tmp_path / "srv")
    port = int(srv.url.rsplit(":", 1)[1])
    env = {**os.environ, "PREEMPTWATCH_SERVER": srv.url, "PREEMPTWATCH_API_KEY": srv.api_key}
    run_id = new_id("spooled")
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        stop_server(srv)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "spooled"
        assert child.wait(30) == 137
    finally:
        child.kill()
    (spooled,) = spooled_marks()
    assert run_id in spooled.name

    srv = start_server(db_url, tmp_path / "srv", port=port)
    try:
        monkeypatch.setenv("PREEMPTWATCH_SERVER", srv.url)
        monkeypatch.setenv("PREEMPTWATCH_API_KEY", srv.api_key)
        api = ApiClient()
        assert api.get_run(run_id)["preempting"] is False
        with pytest.raises(ApiConflict):  # unmarked and heartbeating: not resumable yet
            api.create_run(id=run_id, resume="allow")
        # The next client to start delivers the mark first, so it may resume the run.
        run = preemptwatch.init(id=run_id, resume="allow")
        assert (run.resumed, run.incarnation, run.step) == (True, 2, 0)
        assert spooled_marks() == []
        run.finish(0)
    finally:
        stop_server(srv)
