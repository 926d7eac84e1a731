"""Fencing seen from the client: a newer process resumed the run, the old one stops."""

from __future__ import annotations

import pytest
from tests.client.conftest import Server, new_id, wait_for

import preemptwatch
from preemptwatch.client.api import ApiClient
from preemptwatch.errors import RunFenced


def test_a_resumed_run_fences_the_old_process(
    env_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    old = preemptwatch.init(id=new_id(), heartbeat_interval=0.2)
    old.log({"loss": 1.0})
    assert old.mark_preempting()
    assert old.flush(10)
    # A newer process (here: another client) resumes the run while the old one lives on.
    newer = ApiClient().create_run(id=old.id, resume="allow")
    assert (newer["incarnation"], newer["resumed"], newer["step"]) == (2, True, 0)

    with pytest.warns(RuntimeWarning, match="fenced off"):
        wait_for(lambda: old.fenced, timeout=10)  # its next heartbeat was answered 409
    assert "fenced" in caplog.text and old.id in caplog.text
    with pytest.raises(RunFenced, match="resumed by a newer process"):
        old.log({"loss": 0.5})
    with pytest.raises(RunFenced):
        old.mark_preempting()
    old.finish(1)  # refused locally: the newer incarnation's run is untouched
    record = ApiClient().get_run(old.id)
    assert (record["state"], record["incarnation"], record["step"]) == ("running", 2, 0)


def test_a_write_answered_409_fences_at_once(env_server: Server) -> None:
    old = preemptwatch.init(id=new_id(), heartbeat_interval=60)
    old.mark_preempting()
    ApiClient().create_run(id=old.id, resume="allow")
    with pytest.warns(RuntimeWarning, match="fenced off"), pytest.raises(RunFenced):
        old.save(__file__)
    assert old.fenced
    with pytest.raises(RunFenced):
        old.log({"x": 1})
