"""The sidecar's local endpoints and the `sidecar` source that long-polls them."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import aiohttp
import pytest
from aiohttp import web
from sidecar_helpers import Trigger

from preemptwatch import Watcher
from preemptwatch.notice import Notice, utcnow
from preemptwatch.sidecar import Sidecar, SidecarConfig
from preemptwatch.simulate import serve
from preemptwatch.sources.sidecar import SidecarSource


def config(trigger: Trigger, **kwargs: object) -> SidecarConfig:
    options: dict[str, object] = {"port": 0, "instance_id": "i-test", **kwargs}
    return SidecarConfig(sources=[trigger], **options)  # type: ignore[arg-type]


async def get(url: str, **params: str) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
        s.get(url, params=params) as resp,
    ):
        return resp.status, await resp.json()


async def test_long_poll_answers_within_50ms_of_detection() -> None:
    trigger = Trigger()
    async with Sidecar(config(trigger)) as sc:
        status, body = await get(f"{sc.url}/v1/notice")
        assert status == 200 and body["preempting"] is False and body["notice"] is None
        polls = [asyncio.ensure_future(get(f"{sc.url}/v1/notice", wait="20")) for _ in range(3)]
        await asyncio.sleep(0.3)
        assert not any(p.done() for p in polls)
        n = Notice("ec2", "terminate", deadline=utcnow() + timedelta(seconds=120), id="t1")
        await trigger.fire(n)
        answers = await asyncio.gather(*polls)
        latency = time.monotonic() - n.detected_monotonic
        # Immediately answered once preempting.
        status, again = await get(f"{sc.url}/v1/notice", wait="20")
    assert latency < 0.05, f"long-poll answered {latency * 1000:.1f} ms after detection"
    for status, body in answers:
        assert status == 200 and body["preempting"] is True
        assert body["notice"]["id"] == "t1" and body["notice"]["source"] == "ec2"
    assert again["preempting"] and again["version"] >= 2


async def test_long_poll_times_out_and_refuses_bad_parameters() -> None:
    trigger = Trigger()
    async with Sidecar(config(trigger)) as sc:
        started = time.monotonic()
        status, body = await get(f"{sc.url}/v1/notice", wait="0.4")
        assert status == 200 and not body["preempting"]
        assert 0.35 < time.monotonic() - started < 3
        for bad in (
            {"wait": "soon"},
            {"wait": "-1"},
            {"wait": "9999"},
            {"wait": "1", "after": "x"},
        ):
            status, body = await get(f"{sc.url}/v1/notice", **bad)
            assert status == 400 and body["error"] == "bad_request", bad


async def test_advisory_notices_wake_versioned_polls_but_not_plain_ones() -> None:
    trigger = Trigger()
    async with Sidecar(config(trigger)) as sc:
        _, first = await get(f"{sc.url}/v1/notice")
        plain = asyncio.ensure_future(get(f"{sc.url}/v1/notice", wait="1"))
        versioned = asyncio.ensure_future(
            get(f"{sc.url}/v1/notice", wait="10", after=str(first["version"]))
        )
        await asyncio.sleep(0.2)
        reb = Notice("ec2", "rebalance", raw={"noticeTime": "2020-10-27T08:22:00Z"}, id="r1")
        await trigger.fire(reb)
        _, body = await asyncio.wait_for(versioned, 2)
        assert not plain.done()
        assert body["preempting"] is False
        assert [n["kind"] for n in body["notices"]] == ["rebalance"]
        _, later = await plain
        assert later["preempting"] is False


async def test_sidecar_source_relays_notices_unchanged() -> None:
    trigger = Trigger()
    async with Sidecar(config(trigger, count_rebalance=False)) as sc:
        assert sc.url is not None
        source = SidecarSource(sc.url, wait=5)
        async with Watcher([source], mark=False) as local:
            await asyncio.sleep(0.3)
            reb = Notice("ec2", "rebalance", id="r1", raw={"noticeTime": "2020-10-27T08:22:00Z"})
            await trigger.fire(reb)
            for _ in range(100):
                if local.notices:
                    break
                await asyncio.sleep(0.02)
            assert [n.key for n in local.notices] == [("ec2", "r1")] and not local.preempting
            await trigger.clear(reb)
            deadline = utcnow() + timedelta(seconds=100)
            n = Notice("ec2", "terminate", deadline=deadline, id="t1", raw={"action": "x"})
            await trigger.fire(n)
            assert await local.wait_async(2)
            got = local.notice
    assert got is not None
    assert (got.source, got.kind, got.id, got.deadline) == ("ec2", "terminate", "t1", deadline)
    assert got.raw == {"action": "x"} and got.detected_at == n.detected_at
    assert local.health["sidecar"].polls >= 2


async def test_sidecar_source_rides_out_a_sidecar_restart() -> None:
    first = Trigger()
    sc = Sidecar(config(first))
    url = await sc.start()
    port = int(url.rsplit(":", 1)[1])
    source = SidecarSource(url, wait=1, interval=0.05, max_backoff=0.2)
    async with Watcher([source], mark=False) as local:
        await asyncio.sleep(0.3)
        await sc.stop()
        await asyncio.sleep(0.5)  # polls fail meanwhile
        assert local.health["sidecar"].errors >= 1
        second = Trigger()
        sc = Sidecar(config(second, port=port))
        await sc.start()
        try:
            await second.fire(Notice("gcp", "preempt", id="p1"))
            assert await local.wait_async(5)
        finally:
            await sc.stop()
    assert local.notice is not None and local.notice.key == ("gcp", "p1")


def test_sidecar_source_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREEMPTWATCH_SIDECAR_URL", raising=False)
    with pytest.raises(ValueError, match="PREEMPTWATCH_SIDECAR_URL"):
        SidecarSource()
    monkeypatch.setenv("PREEMPTWATCH_SIDECAR_URL", "http://127.0.0.1:1")
    assert SidecarSource().url == "http://127.0.0.1:1"


async def test_healthz_and_metrics() -> None:
    trigger = Trigger()
    async with Sidecar(config(trigger)) as sc:
        await trigger.fire(
            Notice(
                "ec2",
                "terminate",
                deadline=utcnow() + timedelta(seconds=100),
                raw={"action": "terminate", "time": "x"},
                id="t1",
            )
        )
        assert trigger.ctx is not None
        trigger.ctx.sink.poll_error("ec2", RuntimeError("503 from IMDS"))
        status, health = await get(f"{sc.url}/healthz")
        async with aiohttp.ClientSession() as s, s.get(f"{sc.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert status == 200 and health["status"] == "ok" and health["preempting"] is True
    assert health["instance_id"] == "i-test"
    assert health["sources"]["ec2"]["running"] and health["sources"]["ec2"]["errors"] == 1
    assert 'preemptwatch_notices_total{kind="terminate",source="ec2"} 1.0' in text
    assert 'preemptwatch_poll_errors_total{source="ec2"} 1.0' in text
    assert 'preemptwatch_last_successful_poll_timestamp_seconds{source="ec2"}' in text
    assert "preemptwatch_preempting 1.0" in text
    assert 'preemptwatch_source_up{source="ec2"} 1.0' in text


async def test_detection_latency_is_measured_from_the_publication_time() -> None:
    trigger = Trigger()
    async with Sidecar(config(trigger)) as sc:
        published = utcnow() - timedelta(seconds=3)
        raw = {"action": "terminate", "time": (published + timedelta(minutes=2)).isoformat()}
        await trigger.fire(Notice("ec2", "terminate", raw=raw, id="t"))
        text = sc.metrics.render().decode()
    assert 'preemptwatch_detection_latency_seconds_bucket{le="2.0",source="ec2"} 0.0' in text
    assert 'preemptwatch_detection_latency_seconds_bucket{le="5.0",source="ec2"} 1.0' in text


async def test_sidecar_source_survives_errors_and_garbage() -> None:
    answers: list[tuple[int, str]] = [
        (503, "busy"),
        (200, "{not json"),
        (200, '{"version": "x", "notices": []}'),
        (200, '{"version": 1, "notices": [{"kind": "nope"}]}'),
    ]
    good = Notice("azure", "preempt", id="e1").to_dict()

    async def notice(request: web.Request) -> web.Response:
        if answers:
            status, text = answers.pop(0)
            return web.Response(status=status, text=text, content_type="application/json")
        body = {"version": 2, "preempting": True, "notice": good, "notices": [good]}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/v1/notice", notice)
    runner = await serve(app)
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        source = SidecarSource(url, wait=1, interval=0.02, max_backoff=0.05)
        async with Watcher([source], mark=False) as local:
            assert await local.wait_async(5)
    finally:
        await runner.cleanup()
    assert local.notice is not None and local.notice.key == ("azure", "e1")
    assert local.health["sidecar"].errors == 4
