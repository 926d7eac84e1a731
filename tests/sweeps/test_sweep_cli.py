"""``preemptwatch sweep ...`` against a real server application, and bayes search fed by
the runs' logged metric through the server."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from sweep_helpers import API_KEY, ServerThread, start_server_thread

from preemptwatch.cli import main
from preemptwatch.server.sweep_routes import SWEEP_STORE
from preemptwatch.sweeps import Trial


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    server = start_server_thread(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    try:
        yield server
    finally:
        server.thread.stop()


def cli(srv: ServerThread, *args: str) -> int:
    return main(["sweep", *args, "--server", srv.url, "--api-key", API_KEY])


GOOD = """
program: train.py
method: random
metric: {name: loss, goal: minimize}
parameters:
  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}
  optimizer:
    parameters:
      name: {values: [adam, sgd]}
early_terminate: {type: hyperband, min_iter: 3}
"""


def test_create_show_pause_resume_cancel(
    srv: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(GOOD)
    assert cli(srv, "create", str(path)) == 0
    out, err = capsys.readouterr()
    sweep_id = out.split()[2].rstrip(";")
    assert f"preemptwatch agent {sweep_id}" in out
    assert "early_terminate" in err and "no effect" in err
    assert cli(srv, "show", sweep_id) == 0
    out, _ = capsys.readouterr()
    assert f"sweep {sweep_id}: running (random)" in out
    for action, state in (("pause", "paused"), ("resume", "running"), ("cancel", "cancelled")):
        assert cli(srv, action, sweep_id, "--json") == 0
        assert json.loads(capsys.readouterr().out)["state"] == state
    assert cli(srv, "resume", sweep_id) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert cli(srv, "list") == 0
    assert sweep_id in capsys.readouterr().out
    assert cli(srv, "show", "nosuch") == 2
    assert "no sweep" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("method: grid\nparameters: {x: [1, 2}\n", ["not valid YAML at line 2"]),
        (
            "method: grid\nprogram: t.py\nparameters:\n  lr: {min: 0.0, max: 1.0}\n  b: {}\n",
            ["parameters.lr: method grid needs discrete values", "parameters.b: needs one of"],
        ),
        ("- a\n- b\n", ["(file): a sweep file must be a mapping"]),
    ],
)
def test_bad_sweep_file_changes_nothing(
    srv: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    needles: list[str],
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli(srv, "create", str(path)) == 2
    err = capsys.readouterr().err
    assert "is not a valid sweep file" in err
    for needle in needles:
        assert needle in err
    assert srv.sweeps().list() == []


def test_missing_file(
    srv: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(srv, "create", str(tmp_path / "nope.yaml")) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bayes_learns_from_the_last_logged_metric(server: ServerThread) -> None:
    srv = server
    client, api = srv.client(), srv.sweeps()
    config = {
        "method": "bayes",
        "program": "t.py",
        "metric": {"name": "loss", "goal": "minimize"},
        "parameters": {"x": {"min": -3.0, "max": 3.0}, "tag": {"value": "fixed"}},
    }
    sweep = api.create(config)["id"]
    agent = api.register_agent(sweep)["id"]
    xs = []
    for _ in range(40):
        run = api.next_run(sweep, agent)["run"]
        x = run["params"]["x"]
        assert -3.0 <= x <= 3.0 and run["params"]["tag"] == "fixed"
        xs.append(x)
        live = client.create_run(id=run["id"], sweep_id=sweep, config=run["params"])
        # only the last value counts: the first one points the other way
        client.log(run["id"], live["incarnation"], {"loss": -((x - 1) ** 2)}, step=0)
        client.log(run["id"], live["incarnation"], {"other": 1.0}, step=1)
        client.log(run["id"], live["incarnation"], {"loss": (x - 1) ** 2}, step=2)
        client.finish(run["id"], live["incarnation"], 0)
        api.report_exit(sweep, agent, run["id"], 0)
    # the sampler is fed the last logged value of the metric of each finished run
    store = srv.app[SWEEP_STORE]

    async def trials() -> list[Trial]:
        async with store.db.read() as conn:
            return await store._trials(conn, 1, sweep, store._config(1, sweep, config))

    fed = srv.run(trials())
    assert [t.value for t in fed] == pytest.approx([(x - 1) ** 2 for x in xs])
    assert all(t.done for t in fed)
    # and it learns: late suggestions are nearer the optimum than random draws
    # (a uniform draw on [-3, 3] is 1.67 from x = 1 on average)
    assert statistics.mean(abs(x - 1) for x in xs[-15:]) < 1.2
