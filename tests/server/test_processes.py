"""Real server processes: three replicas reaping one PostgreSQL database, kill -9 during
concurrent finishes, the first key, the admin command and the command line."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import requests

from preemptwatch.server.db import Database
from preemptwatch.server.store import RunStore
from preemptwatch.server.testing import ServerProcess

from .conftest import Api

CLI = [sys.executable, "-m", "preemptwatch"]


def _metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.postgres
async def test_three_replicas_reap_each_stale_run_once_and_queue_it_once(
    pg_url: str, tmp_path: Path
) -> None:
    args = ["--reap-interval", "0.2", "--heartbeat-timeout", "1"]
    replicas = [
        ServerProcess(pg_url, workdir=tmp_path / f"r{i}", args=args, api_key="k") for i in range(3)
    ]
    # they start together: migrations and the first key are done once, under a lock
    starters = [asyncio.to_thread(p.start) for p in replicas]
    await asyncio.gather(*starters)
    try:
        db = Database(pg_url, pool_size=2)
        store = RunStore(db)
        project = await store.project_for_key("k")
        assert project is not None
        await store.create_sweep(project.id, "s1", {"requeue_crashed": False})
        await store.create_sweep(project.id, "s2", {"requeue_crashed": True})
        n = 300
        async with aiohttp.ClientSession() as session:
            apis = [Api(session, p.url, "k") for p in replicas]

            async def start(i: int) -> None:
                api = apis[i % 3]
                await api.create(f"r{i}", sweep_id="s2" if i % 5 == 0 else "s1")
                if i % 2:
                    await api.post(f"/api/v1/runs/r{i}/preempting", {"incarnation": 1})

            for chunk in range(0, n, 50):
                await asyncio.gather(*(start(i) for i in range(chunk, chunk + 50)))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                _, body = await apis[0].get("/api/v1/runs?state=running&limit=1")
                if not body["runs"]:
                    break
                await asyncio.sleep(0.2)
            _, body = await apis[1].get("/api/v1/runs?limit=1000")
        states = {r["id"]: r["state"] for r in body["runs"]}
        assert len(states) == n
        for i in range(n):
            assert states[f"r{i}"] == ("preempted" if i % 2 else "crashed")
        queued = await store.queued_runs(project.id, "s1") + await store.queued_runs(
            project.id, "s2"
        )
        expected = [f"r{i}" for i in range(n) if i % 2 or i % 5 == 0]
        assert sorted(queued) == sorted(expected)  # each once
        assert {r["id"]: r["requeues"] for r in body["runs"]} == {
            f"r{i}": int(f"r{i}" in expected) for i in range(n)
        }
        reaped = [_metric(p.url, "preemptwatch_runs_reaped_total") for p in replicas]
        assert sum(reaped) == n, reaped
        await db.dispose()
    finally:
        for proc in replicas:
            proc.stop()


async def test_kill_9_during_concurrent_finishes_loses_no_acknowledged_state(
    server_process: ServerProcess,
) -> None:
    n = 150
    acked: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        api = Api(session, server_process.url, server_process.api_key)
        for chunk in range(0, n, 50):
            await asyncio.gather(*(api.create(f"r{i}") for i in range(chunk, chunk + 50)))
        for i in range(0, n, 3):
            await api.post(f"/api/v1/runs/r{i}/preempting", {"incarnation": 1})

        async def finish(i: int) -> None:
            await asyncio.sleep(i * 0.002)
            try:
                await api.post(f"/api/v1/runs/r{i}/log", {"incarnation": 1, "data": {"i": i}})
                status, run = await api.post(
                    f"/api/v1/runs/r{i}/finish", {"incarnation": 1, "exit_code": i % 2}
                )
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return
            if status == 200:
                acked[f"r{i}"] = run["state"]

        async def killer() -> None:
            while len(acked) < n // 3:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(server_process.kill)

        await asyncio.gather(killer(), *(finish(i) for i in range(n)))
        assert n // 3 <= len(acked) < n, len(acked)
        await asyncio.to_thread(server_process.start)
        _, body = await api.get("/api/v1/runs?limit=1000")
        states = {r["id"]: r for r in body["runs"]}
        for run_id, state in acked.items():
            assert states[run_id]["state"] == state
            i = int(run_id[1:])
            expected = "finished" if i % 2 == 0 else ("preempted" if i % 3 == 0 else "failed")
            assert state == expected
            assert states[run_id]["step"] == 0
        # the server works on after the restart
        assert (await api.create("after"))["incarnation"] == 1


def test_the_first_key_is_generated_and_printed_once(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    env = {k: v for k, v in os.environ.items() if k != "PREEMPTWATCH_API_KEY"}
    proc = ServerProcess(db, workdir=tmp_path)
    for attempt in range(2):
        out = tmp_path / f"out{attempt}.log"
        with open(out, "wb") as fh:
            child = subprocess.Popen(proc.command(), stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 30
            while "server on http" not in out.read_text() and time.monotonic() < deadline:
                assert child.poll() is None, out.read_text()
                time.sleep(0.05)
            keys = re.findall(r"PREEMPTWATCH_API_KEY=(\S+)", out.read_text())
            if attempt == 0:
                assert len(keys) == 1
                key = keys[0]
                ok = requests.get(
                    f"{proc.url}/api/v1/runs", headers={"Authorization": f"Bearer {key}"}, timeout=5
                )
                assert ok.status_code == 200
            else:
                assert keys == []  # printed once only
        finally:
            child.terminate()
            assert child.wait(15) == 0


def test_create_key_makes_an_isolated_project(server_process: ServerProcess) -> None:
    out = subprocess.run(
        [*CLI, "server", "create-key", "--project", "team-b", "--db", server_process.db_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = out.stdout.strip()
    assert key and "\n" not in key
    mine = server_process.headers()
    theirs = {"Authorization": f"Bearer {key}"}
    url = f"{server_process.url}/api/v1/runs"
    assert requests.post(url, json={"id": "x"}, headers=mine, timeout=5).status_code == 201
    assert requests.get(f"{url}/x", headers=theirs, timeout=5).status_code == 404
    created = requests.post(url, json={"id": "x"}, headers=theirs, timeout=5)
    assert created.status_code == 201 and created.json()["project"] == "team-b"


def test_help_and_bad_settings() -> None:
    out = subprocess.run([*CLI, "server", "--help"], capture_output=True, text=True, timeout=60)
    for flag in (
        "--db",
        "--host",
        "--port",
        "--heartbeat-timeout",
        "--storage",
        "--max-file-size",
        "--reap-interval",
        "create-key",
    ):
        assert flag in out.stdout
    bad = subprocess.run(
        [*CLI, "server", "--db", "mysql://x/y", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unsupported database" in bad.stderr
    bad = subprocess.run(
        [*CLI, "server", "--max-file-size", "lots"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--max-file-size" in bad.stderr
