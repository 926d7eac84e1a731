"""A run's writes against the real server: logs, files, heartbeats, finishing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from tests.client.conftest import Server, new_id, wait_for

import preemptwatch
from preemptwatch.client.api import ApiClient
from preemptwatch.errors import ApiNotFound


def test_log_steps_count_on_and_never_go_backwards(env_server: Server) -> None:
    run = preemptwatch.init(id=new_id())
    assert [run.log({"loss": v}) for v in (3.0, 2.0, 1.0)] == [0, 1, 2]
    assert run.log({"acc": 0.5}, step=2) == 2  # the same step merges
    assert run.log({"loss": 0.5}, step=10) == 10
    with pytest.raises(ValueError, match="never go backwards"):
        run.log({"loss": 9}, step=4)
    with pytest.raises(TypeError, match="JSON"):
        run.log({"bad": object()})
    assert run.step == 10
    assert run.flush(10)
    history = ApiClient().history(run.id)
    assert [h["step"] for h in history] == [0, 1, 2, 10]
    assert history[2]["data"] == {"loss": 1.0, "acc": 0.5}
    assert ApiClient().get_run(run.id)["step"] == 10


def test_log_takes_numpy_tensors_and_non_finite_numbers(env_server: Server) -> None:
    import numpy as np
    import torch

    run = preemptwatch.init(id=new_id())
    run.log({"loss": float("nan"), "grad": float("inf"), "lr": np.float32(0.5)})
    run.log({"w": np.arange(3), "t": torch.tensor(1.5), "low": -float("inf")})
    assert run.flush(10)
    history = ApiClient().history(run.id)
    assert [h["data"] for h in history] == [
        {"loss": "NaN", "grad": "Infinity", "lr": 0.5},
        {"w": [0, 1, 2], "t": 1.5, "low": "-Infinity"},
    ]


def test_save_and_restore_stream_files(env_server: Server, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "checkpoint.tar"
    src.write_bytes(data)
    run = preemptwatch.init(id=new_id())
    answer = run.save(src)
    assert answer["name"] == "checkpoint.tar"
    assert answer["size"] == len(data)
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    run.save(src, name="ckpt/latest.tar")
    assert sorted(f["name"] for f in run.files()) == ["checkpoint.tar", "ckpt/latest.tar"]
    out = tmp_path / "restored"
    path = run.restore("checkpoint.tar", root=out)
    assert path == out / "checkpoint.tar"
    assert path.read_bytes() == data
    assert run.restore("ckpt/latest.tar", root=out).read_bytes() == data
    with pytest.raises(ApiNotFound):
        run.restore("missing.tar", root=out)
    assert not (out / "missing.tar").exists()
    with pytest.raises(ValueError):
        run.restore("../escape", root=out)
    with pytest.raises(FileNotFoundError):
        run.save(tmp_path / "nope")


def test_heartbeats_reach_the_server(env_server: Server) -> None:
    run = preemptwatch.init(id=new_id(), heartbeat_interval=0.2)
    api = ApiClient()
    first = api.get_run(run.id)["heartbeat_at"]
    wait_for(lambda: api.get_run(run.id)["heartbeat_at"] != first, timeout=10)


def test_heartbeat_tells_the_run_it_was_marked_elsewhere(env_server: Server) -> None:
    run = preemptwatch.init(id=new_id(), heartbeat_interval=0.2)
    assert not run.preempting
    ApiClient().mark_instance_preempting("i-test")
    wait_for(lambda: run.preempting, timeout=10)


@pytest.mark.parametrize(
    ("mark", "code", "state"),
    [(False, 0, "finished"), (True, 0, "finished"), (False, 2, "failed"), (True, 2, "preempted")],
)
def test_exit_status_table(env_server: Server, mark: bool, code: int, state: str) -> None:
    run = preemptwatch.init(id=new_id())
    if mark:
        assert run.mark_preempting() is True
    run.finish(code)
    record = ApiClient().get_run(run.id)
    assert (record["state"], record["exit_code"]) == (state, code)
    assert run.state == state
    run.finish(code)  # a second finish changes nothing
    with pytest.raises(RuntimeError, match="finished"):
        run.log({"late": 1})


def test_context_manager_reports_an_exception_as_a_failure(env_server: Server) -> None:
    run_id = new_id()
    with pytest.raises(KeyError), preemptwatch.init(id=run_id) as run:
        run.log({"x": 1})
        raise KeyError("boom")
    assert ApiClient().get_run(run_id)["state"] == "failed"
    with preemptwatch.init(id=new_id()) as ok:
        ok.log({"x": 1})
    assert ApiClient().get_run(ok.id)["state"] == "finished"


def test_finish_without_the_server_only_warns(
    env_server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = preemptwatch.init(id=new_id())
    run.api.server = "http://127.0.0.1:9"  # nothing listens there
    run.api.retry_budget = 0.3
    run.finish(1, timeout=0.5)
    assert "could not finish run" in caplog.text
    assert preemptwatch.client.active_run() is None


def test_sweep_params_from_the_agent_are_the_default_config(
    env_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREEMPTWATCH_SWEEP_PARAMS", '{"lr": 0.01, "layers": 3}')
    run = preemptwatch.init(id=new_id())
    assert run.config == {"lr": 0.01, "layers": 3}
    run.finish()
    explicit = preemptwatch.init(id=new_id(), config={"lr": 1})
    assert explicit.config == {"lr": 1}
    explicit.finish()
    monkeypatch.setenv("PREEMPTWATCH_SWEEP_PARAMS", "not json")
    ignored = preemptwatch.init(id=new_id())
    assert ignored.config == {}
    ignored.finish()
