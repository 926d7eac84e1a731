"""Marking the instance's runs on a real server: nothing lost across a sidecar restart,
run clients' spooled marks delivered too, a refused key reported and kept."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import aiohttp
from aiohttp import web
from sidecar_helpers import Trigger, free_port

from preemptwatch.client.spool import spool_mark, spooled_marks
from preemptwatch.notice import Notice, utcnow
from preemptwatch.server.testing import InProcessServer
from preemptwatch.sidecar import Sidecar, SidecarConfig, static_token


async def api(server: InProcessServer, method: str, path: str, **body: object) -> dict:
    async with (
        aiohttp.ClientSession(headers=server.headers()) as s,
        s.request(method, f"{server.url}{path}", json=body or None) as resp,
    ):
        assert resp.status < 300, await resp.text()
        return dict(await resp.json())


def config(trigger: Trigger, server: str, spool: Path, key: str) -> SidecarConfig:
    return SidecarConfig(
        sources=[trigger],
        port=0,
        instance_id="i-test",
        server=server,
        token=static_token(key),
        spool_dir=spool,
        respool_interval=0.2,
    )


async def wait_until(check: object, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while not await check():  # type: ignore[operator]
        assert loop.time() < until, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_marks_survive_a_sidecar_restart_and_client_marks_are_delivered(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    port = free_port()
    down = f"http://127.0.0.1:{port}"
    first = Trigger()
    sc = Sidecar(config(first, down, spool, "pw-test-key"))
    await sc.start()
    try:
        deadline = utcnow() + timedelta(seconds=120)
        await first.fire(Notice("ec2", "terminate", deadline=deadline, id="t1"))

        async def spooled() -> bool:
            return sc.marker is not None and len(sc.marker.pending()) == 1

        await wait_until(spooled)
    finally:
        await sc.stop()
    assert len(list(spool.glob("mark-*.json"))) == 1

    # The server comes up where the first sidecar expected it.
    server = InProcessServer(f"sqlite:///{tmp_path / 'pw.db'}", str(tmp_path / "f"))
    await server.runner.setup()
    await web.TCPSite(server.runner, "127.0.0.1", port).start()
    server.url = down
    try:
        await api(server, "POST", "/api/v1/runs", id="a", resume="never", instance_id="i-test")
        await api(server, "POST", "/api/v1/runs", id="b", resume="never", instance_id="i-test")
        other = await api(server, "POST", "/api/v1/runs", id="c", resume="never", instance_id="i-x")
        # A run client on another instance could not deliver its own mark: it waits here.
        spool_mark(server.url, "c", other["incarnation"], {"source": "gcp"}, directory=spool)
        assert spooled_marks(spool)
        second = Trigger()
        async with Sidecar(config(second, server.url, spool, server.api_key)) as sc2:

            async def delivered() -> bool:
                runs = [await api(server, "GET", f"/api/v1/runs/{r}") for r in "abc"]
                return all(r["preempting"] for r in runs)

            await wait_until(delivered)
            await wait_until(lambda: _empty(spool))
            metrics = sc2.metrics.render().decode()
    finally:
        await server.runner.cleanup()
    assert 'preemptwatch_actions_total{action="mark",outcome="ok"} 1.0' in metrics


async def _empty(spool: Path) -> bool:
    return not list(spool.glob("*.json"))


async def test_a_refused_key_is_reported_and_the_mark_kept(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    async with InProcessServer(f"sqlite:///{tmp_path / 'pw.db'}", str(tmp_path / "f")) as server:
        await api(server, "POST", "/api/v1/runs", id="a", resume="never", instance_id="i-test")
        trigger = Trigger()
        async with Sidecar(config(trigger, server.url, spool, "wrong-key")) as sc:
            await trigger.fire(Notice("ec2", "terminate", id="t1"))

            async def failed() -> bool:
                text = sc.metrics.render().decode()
                return 'preemptwatch_actions_total{action="mark",outcome="failed"} 1.0' in text

            await wait_until(failed)
        run = await api(server, "GET", "/api/v1/runs/a")
    assert run["preempting"] is False
    assert len(list(spool.glob("mark-*.json"))) == 1  # kept for a sidecar with a good key
