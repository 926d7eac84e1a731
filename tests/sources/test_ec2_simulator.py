"""The EC2 metadata simulator's protocol, checked with plain HTTP requests, and the
``preemptwatch simulate ec2`` command as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from source_helpers import simulator_cli

from preemptwatch import Watcher
from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator
from preemptwatch.sources.ec2 import EC2Source, parse_event_date, parse_rfc3339

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


@pytest.fixture
def sim() -> Iterator[tuple[EC2Simulator, SimulatorThread]]:
    simulator = EC2Simulator(max_token_ttl=30)
    thread = SimulatorThread(simulator)
    thread.start()
    try:
        yield simulator, thread
    finally:
        thread.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def token(http: aiohttp.ClientSession, url: str, ttl: str = "21600") -> str:
    async with http.put(f"{url}/latest/api/token", headers={TTL: ttl}) as r:
        assert r.status == 200
        return await r.text()


async def get(http: aiohttp.ClientSession, url: str, path: str, tok: str | None) -> Any:
    headers = {TOKEN: tok} if tok is not None else {}
    async with http.get(f"{url}/latest/{path}", headers=headers) as r:
        return r.status, await r.text(), r.headers


async def test_token_rules(sim: Any, http: aiohttp.ClientSession) -> None:
    simulator, thread = sim
    url = thread.url
    for bad in (None, "", "0", "21601", "abc", "-5"):
        headers = {TTL: bad} if bad is not None else {}
        async with http.put(f"{url}/latest/api/token", headers=headers) as r:
            assert r.status == 400, bad
    async with http.put(
        f"{url}/latest/api/token", headers={TTL: "60", "X-Forwarded-For": "10.0.0.1"}
    ) as r:
        assert r.status == 403
    async with http.put(f"{url}/2021-01-03/api/token", headers={TTL: "60"}) as r:
        assert r.status == 403
    async with http.put(f"{url}/latest/api/token", headers={TTL: "21600"}) as r:
        assert r.status == 200 and r.headers[TTL] == "30"  # capped by max_token_ttl
        tok = await r.text()
    assert simulator.tokens_issued == 1

    status, _, headers = await get(http, url, "meta-data/instance-id", None)
    assert status == 401 and TTL not in headers
    status, _, _ = await get(http, url, "meta-data/instance-id", "not-a-token")
    assert status == 401
    status, text, headers = await get(http, url, "meta-data/instance-id", tok)
    assert status == 200 and text == "i-0123456789abcdef0"
    assert 28 <= int(headers[TTL]) <= 30 and headers["Content-Type"].startswith("text/plain")

    thread.call(simulator.revoke_tokens)
    status, _, _ = await get(http, url, "meta-data/instance-id", tok)
    assert status == 401


async def test_token_expires(http: aiohttp.ClientSession) -> None:
    simulator = EC2Simulator(max_token_ttl=0.3)
    with SimulatorThread(simulator) as url:
        tok = await token(http, url, "60")
        status, _, headers = await get(http, url, "meta-data/instance-id", tok)
        assert status == 200 and headers[TTL] == "0"  # whole seconds left, rounded down
        await asyncio.sleep(0.4)
        status, _, _ = await get(http, url, "meta-data/instance-id", tok)
        assert status == 401


async def test_imdsv1_optional_answers_without_token(http: aiohttp.ClientSession) -> None:
    with SimulatorThread(EC2Simulator(imdsv1=True)) as url:
        status, text, headers = await get(http, url, "meta-data/instance-life-cycle", None)
        assert status == 200 and text == "spot" and TTL not in headers


async def test_metadata_paths_and_bodies(sim: Any, http: aiohttp.ClientSession) -> None:
    simulator, thread = sim
    url = thread.url
    tok = await token(http, url)
    for path in (
        "meta-data/spot/instance-action",
        "meta-data/spot/termination-time",
        "meta-data/events/recommendations/rebalance",
        "meta-data/autoscaling/target-lifecycle-state",
        "meta-data/no-such-thing",
    ):
        status, text, _ = await get(http, url, path, tok)
        assert status == 404 and "404 - Not Found" in text, path
    assert (await get(http, url, "meta-data/events/maintenance/scheduled", tok))[1] == "[]"
    assert (await get(http, url, "meta-data/instance-life-cycle", tok))[1] == "spot"
    listing = (await get(http, url, "meta-data/", tok))[1].split("\n")
    assert "instance-id" in listing and "events/" in listing and "spot/" not in listing
    status, text, _ = await get(http, url, "dynamic/instance-identity/document", tok)
    doc = json.loads(text)
    assert status == 200 and doc["instanceId"] == "i-0123456789abcdef0"
    assert {"region", "availabilityZone", "instanceType", "accountId"} <= set(doc)

    thread.call(lambda: simulator.schedule("terminate", lead=120))
    thread.call(lambda: simulator.schedule("rebalance"))
    thread.call(lambda: simulator.schedule("maintenance", lead=86400, code="instance-stop"))
    thread.call(lambda: simulator.schedule("asg-terminated"))
    status, text, _ = await get(http, url, "meta-data/spot/instance-action", tok)
    action = json.loads(text)
    assert status == 200 and set(action) == {"action", "time"} and action["action"] == "terminate"
    assert 118 < (parse_rfc3339(action["time"]) - parse_rfc3339(_now())).total_seconds() <= 121
    assert (await get(http, url, "meta-data/spot/termination-time", tok))[1] == action["time"]
    assert "spot/" in (await get(http, url, "meta-data/", tok))[1].split("\n")
    rebalance = await get(http, url, "meta-data/events/recommendations/rebalance", tok)
    assert set(json.loads(rebalance[1])) == {"noticeTime"}
    events = json.loads((await get(http, url, "meta-data/events/maintenance/scheduled", tok))[1])
    assert len(events) == 1
    assert set(events[0]) == {"Code", "Description", "EventId", "NotBefore", "NotAfter", "State"}
    assert events[0]["Code"] == "instance-stop" and events[0]["State"] == "active"
    assert parse_event_date(events[0]["NotAfter"]) > parse_event_date(events[0]["NotBefore"])
    asg = await get(http, url, "meta-data/autoscaling/target-lifecycle-state", tok)
    assert asg[:2] == (200, "Terminated")

    thread.call(lambda: simulator.clear())
    assert (await get(http, url, "meta-data/spot/instance-action", tok))[0] == 404
    events = json.loads((await get(http, url, "meta-data/events/maintenance/scheduled", tok))[1])
    assert events[0]["State"] == "canceled" and events[0]["Description"].startswith("Canceled")


def _now() -> str:
    from preemptwatch.notice import utcnow
    from preemptwatch.simulate.ec2 import rfc3339

    return rfc3339(utcnow())


async def test_faults(sim: Any, http: aiohttp.ClientSession) -> None:
    simulator, thread = sim
    url = thread.url
    tok = await token(http, url)
    for status in (403, 500, 503):
        thread.call(lambda s=status: simulator.fault(s, count=2))
        assert (await get(http, url, "meta-data/instance-id", tok))[0] == status
        assert (await get(http, url, "meta-data/instance-id", tok))[0] == status
        assert (await get(http, url, "meta-data/instance-id", tok))[0] == 200
    thread.call(lambda: simulator.fault(401))
    await token(http, url)  # a 401 fault leaves token requests alone
    assert (await get(http, url, "meta-data/instance-id", tok))[0] == 401
    thread.call(lambda: simulator.fault(mode="garbage"))
    status, text, _ = await get(http, url, "dynamic/instance-identity/document", tok)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(text)
    thread.call(lambda: simulator.fault(mode="garbage"))
    status, text, _ = await get(http, url, "meta-data/spot/instance-action", tok)
    assert status == 200  # garbage even where nothing is scheduled
    with pytest.raises(ValueError):
        json.loads(text)
    async with http.get(f"{url}/latest/api/token", headers={TOKEN: tok}) as r:
        assert r.status == 405
    thread.call(lambda: simulator.fault(mode="reset", count=2))
    with pytest.raises(aiohttp.ClientError):
        await get(http, url, "meta-data/instance-id", tok)
    thread.call(lambda: simulator.fault(mode="timeout", method="PUT"))
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with http.put(
            f"{url}/latest/api/token", headers={TTL: "60"}, timeout=aiohttp.ClientTimeout(total=0.3)
        ):
            pass
    assert time.monotonic() - started < 1
    assert simulator.statuses[0] >= 1  # the resets
    bad_faults: list[dict[str, Any]] = [
        {},
        {"status": 200, "mode": "timeout"},
        {"mode": "explode"},
        {"status": 503, "count": 0},
        {"status": 503, "method": "POST"},
    ]
    for bad in bad_faults:
        with pytest.raises(ValueError):
            simulator.fault(**bad)


async def test_control_api_over_http(sim: Any, http: aiohttp.ClientSession) -> None:
    simulator, thread = sim
    url = thread.url
    async with http.post(f"{url}/_control/schedule", json={"kind": "stop", "after": 0.2}) as r:
        assert r.status == 200
        scheduled = (await r.json())["scheduled"]
        assert scheduled["kind"] == "stop" and not scheduled["visible"]
    for bad in (
        {"kind": "explode"},
        {"after": 1},
        {"kind": "stop", "after": -1},
        {"kind": "stop", "after": "soon"},
        {"kind": "rebalance", "colour": "red"},
        {"kind": "maintenance", "state": "pending"},
        {"kind": "maintenance", "code": "instance-explode"},
        {"kind": "terminate", "after": "nan"},
    ):
        async with http.post(f"{url}/_control/schedule", json=bad) as r:
            assert r.status == 400, bad
            assert (await r.json())["error"] == "bad_request"
    async with http.post(f"{url}/_control/schedule", data=b"not json") as r:
        assert r.status == 400
    tok = await token(http, url)
    assert (await get(http, url, "meta-data/spot/instance-action", tok))[0] == 404
    await asyncio.sleep(0.25)
    status, text, _ = await get(http, url, "meta-data/spot/instance-action", tok)
    assert status == 200 and json.loads(text)["action"] == "stop"

    async with http.post(f"{url}/_control/fault", json={"status": 503, "count": 1}) as r:
        assert r.status == 200
    assert (await get(http, url, "meta-data/spot/instance-action", tok))[0] == 503
    async with http.post(f"{url}/_control/fault", json={"mode": "nope"}) as r:
        assert r.status == 400
    async with http.post(f"{url}/_control/clear", json={"kind": "stop"}) as r:
        assert r.status == 200 and (await r.json())["cleared"] == 1
    async with http.post(f"{url}/_control/clear", json={"kind": "nope"}) as r:
        assert r.status == 400
    assert (await get(http, url, "meta-data/spot/instance-action", tok))[0] == 404
    async with http.get(f"{url}/_control/state") as r:
        state = await r.json()
    assert state["notices"] == [] and state["faults"] == []
    assert state["requests"] == simulator.requests == 5  # control requests not counted
    assert state["requests_by_path"]["GET /latest/meta-data/spot/instance-action"] == 4
    assert state["statuses"] == {"200": 2, "404": 2, "503": 1}


# ---------------------------------------------------------------- the CLI


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_cli_simulator_answers_a_real_poll() -> None:
    port = _free_port()
    args = ("--notice-after", "1", "--kind", "terminate", "--lead", "100")
    with simulator_cli("ec2", *args, port=port) as url:
        assert url == f"http://127.0.0.1:{port}"
        started = time.monotonic()
        source = EC2Source(url=url, interval=0.1)
        async with Watcher([source], mark=False) as watcher:
            assert await watcher.wait_async(10)
        assert time.monotonic() - started < 5
        notice = watcher.notice
        assert notice is not None and notice.kind == "terminate"
        assert 90 < (notice.seconds_left() or 0) <= 100


def test_cli_refuses_bad_flags() -> None:
    cmd = [sys.executable, "-m", "preemptwatch", "simulate", "ec2", "--port", str(_free_port())]
    out = subprocess.run([*cmd, "--kind", "explode"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = subprocess.run([*cmd, "--notice-after", "-1"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--notice-after must not be negative" in out.stderr
