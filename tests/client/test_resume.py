"""Every row of the resume table through `init`, against the real server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tests.client.conftest import Server, new_id

import preemptwatch
from preemptwatch.client.api import ApiClient
from preemptwatch.client.autoresume import resume_file
from preemptwatch.errors import ApiConflict, ApiNotFound, ConfigError


def crashed_run(run_id: str, steps: int = 3) -> None:
    """A run that logged ``steps`` steps and ended with a failure."""
    run = preemptwatch.init(id=run_id)
    for i in range(steps):
        run.log({"loss": 1.0 / (i + 1)})
    run.finish(1)


def test_never_creates_a_new_run(env_server: Server) -> None:
    run_id = new_id()
    run = preemptwatch.init(id=run_id, resume="never", config={"lr": 0.1})
    assert (run.id, run.resumed, run.step, run.incarnation) == (run_id, False, -1, 1)
    assert run.config == {"lr": 0.1}
    record = ApiClient().get_run(run_id)
    assert record["state"] == "running"
    assert record["instance_id"] == "i-test"
    assert record["host"] == socket.gethostname()


def test_never_refuses_an_existing_run(env_server: Server) -> None:
    run_id = new_id()
    crashed_run(run_id)
    with pytest.raises(ApiConflict):
        preemptwatch.init(id=run_id)
    assert ApiClient().get_run(run_id)["incarnation"] == 1


def test_must_refuses_an_unknown_run_and_creates_nothing(env_server: Server) -> None:
    run_id = new_id()
    with pytest.raises(ApiNotFound):
        preemptwatch.init(id=run_id, resume="must")
    with pytest.raises(ApiNotFound):
        ApiClient().get_run(run_id)
    assert preemptwatch.client.active_run() is None


@pytest.mark.parametrize("mode", ["must", "allow"])
def test_must_and_allow_resume_from_the_last_step(env_server: Server, mode: str) -> None:
    run_id = new_id()
    crashed_run(run_id, steps=4)
    run = preemptwatch.init(id=run_id, resume=mode)
    assert (run.resumed, run.step, run.incarnation) == (True, 3, 2)
    assert run.log({"loss": 0.1}) == 4
    run.finish(0)
    history = ApiClient().history(run_id)
    assert [(h["step"], h["incarnation"]) for h in history] == [
        (0, 1),
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 2),
    ]


def test_allow_creates_an_unknown_run(env_server: Server) -> None:
    run_id = new_id()
    run = preemptwatch.init(id=run_id, resume="allow")
    assert (run.id, run.resumed, run.step) == (run_id, False, -1)


def test_resuming_a_run_that_is_still_alive_is_refused(env_server: Server) -> None:
    run_id = new_id()
    preemptwatch.init(id=run_id)
    other = ApiClient()
    with pytest.raises(ApiConflict):
        other.create_run(id=run_id, resume="allow")


def test_run_id_and_resume_from_the_environment(
    env_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = new_id()
    crashed_run(run_id, steps=2)
    monkeypatch.setenv("PREEMPTWATCH_RUN_ID", run_id)
    monkeypatch.setenv("PREEMPTWATCH_RESUME", "must")
    run = preemptwatch.init()
    assert (run.id, run.resumed, run.step) == (run_id, True, 1)


def test_run_ids_are_normalised_and_checked(env_server: Server) -> None:
    suffix = new_id()
    run = preemptwatch.init(id=f"my run/{suffix}")
    assert run.id == f"my-run-{suffix}"
    run.finish(0)
    with pytest.raises(ConfigError):
        preemptwatch.init(id="x" * 65)
    with pytest.raises(ConfigError):
        preemptwatch.init(id="")


def test_auto_resumes_the_unfinished_run_of_this_directory(env_server: Server) -> None:
    first = preemptwatch.init(resume=True)
    first.log({"a": 1})
    first.log({"a": 2})
    assert resume_file().exists()
    first.finish(1)  # did not finish cleanly: the file stays
    again = preemptwatch.init(resume="auto")
    assert (again.id, again.resumed, again.step) == (first.id, True, 1)
    again.finish(0)  # clean finish: the file goes
    assert not resume_file().exists()
    fresh = preemptwatch.init(resume="auto")
    assert fresh.id != first.id and not fresh.resumed


def test_auto_from_another_directory_starts_a_new_run(
    env_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = preemptwatch.init(resume="auto")
    first.finish(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    second = preemptwatch.init(resume="auto")
    assert second.id != first.id and not second.resumed


def test_a_second_init_while_a_run_is_active_is_refused(env_server: Server) -> None:
    run = preemptwatch.init()
    with pytest.raises(RuntimeError, match="still active"):
        preemptwatch.init()
    run.finish(0)
