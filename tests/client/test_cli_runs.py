"""``preemptwatch runs list`` / ``runs show`` against the real server."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from tests.client.conftest import Server, new_id

import preemptwatch
from preemptwatch.cli import runs as runs_cli
from preemptwatch.client.api import ApiClient


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="preemptwatch")
    runs_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["runs", *argv])
    return int(args.func(args))


@pytest.fixture
def two_runs(env_server: Server) -> tuple[str, str]:
    done = preemptwatch.init(id=new_id("done"), config={"lr": 0.1})
    done.log({"loss": 0.5})
    done.log({"loss": 0.25})
    done.save(__file__, name="code.py")
    done.finish(0)
    live = preemptwatch.init(id=new_id("live"))
    live.mark_preempting()
    return done.id, live.id


def test_list_prints_a_table_newest_first(
    two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    done, live = two_runs
    assert cli("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == list(runs_cli.COLUMNS)
    ids = [line.split()[0] for line in lines[1:]]
    assert ids.index(live) < ids.index(done)
    row = next(line.split() for line in lines if line.startswith(live))
    assert row[1] == "running*"  # marked preempting
    row = next(line.split() for line in lines if line.startswith(done))
    assert row[1:4] == ["finished", "1", "1"]


def test_list_filters_by_state_and_prints_json(
    two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    done, live = two_runs
    assert cli("list", "--state", "finished", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert done in [r["id"] for r in listed]
    assert live not in [r["id"] for r in listed]
    assert {r["state"] for r in listed} == {"finished"}


def test_list_filters_by_sweep(
    env_server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from preemptwatch.sweeps.api import SweepApi

    sweep = SweepApi(ApiClient()).create(
        {"program": "train.py", "method": "grid", "parameters": {"lr": {"values": [0.1, 0.01]}}}
    )
    monkeypatch.setenv("PREEMPTWATCH_SWEEP_ID", sweep["id"])  # as the agent sets it
    in_sweep = preemptwatch.init(id=new_id("swept"))
    assert in_sweep.sweep_id == sweep["id"]
    in_sweep.finish(0)
    monkeypatch.delenv("PREEMPTWATCH_SWEEP_ID")
    outside = preemptwatch.init(id=new_id("alone"))
    outside.finish(0)
    assert cli("list", "--sweep", sweep["id"], "--json") == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [in_sweep.id]
    assert cli("list", "--sweep", new_id("nosweep")) == 0
    assert capsys.readouterr().out.strip() == "no runs"


def test_show_prints_the_run_files_and_history(
    two_runs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    done, _ = two_runs
    assert cli("show", done) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(None, 1) for line in out.split("\n\n")[0].splitlines())
    assert (fields["id"], fields["state"], fields["step"]) == (done, "finished", "1")
    assert fields["config"] == '{"lr": 0.1}'
    assert "code.py" in out
    assert '{"loss": 0.25}' in out
    assert cli("show", done, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["id"] == done
    assert [h["step"] for h in shown["history"]] == [0, 1]
    assert shown["files"][0]["name"] == "code.py"


def test_unknown_run_and_bad_key_fail_clearly(
    env_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("show", "no-such-run") == 1
    assert "no-such-run" in capsys.readouterr().err
    assert cli("list", "--api-key", "wrong") == 1
    assert "401" in capsys.readouterr().err
    assert ApiClient().list_runs(limit=1) is not None


def test_the_installed_command(two_runs: tuple[str, str], env_server: Server) -> None:
    done, _ = two_runs
    out = subprocess.run(
        [sys.executable, "-m", "preemptwatch", "runs", "list", "--state", "finished"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert any(line.split()[:2] == [done, "finished"] for line in out.stdout.splitlines())
