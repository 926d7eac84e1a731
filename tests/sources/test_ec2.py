"""The EC2 source inside a real `Watcher`, polling the EC2 simulator over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from preemptwatch import Notice, Watcher
from preemptwatch.notice import utcnow
from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator
from preemptwatch.sources import make_source
from preemptwatch.sources.base import SourceContext, SourceError
from preemptwatch.sources.ec2 import (
    EC2Source,
    parse_event_date,
    parse_rfc3339,
)

FAST = {"interval": 0.05, "slow_interval": 0.05, "maintenance_interval": 0.05}


class Sim:
    """A running simulator: ``sim.call(fn, ...)`` runs on its loop."""

    def __init__(self, simulator: EC2Simulator, thread: SimulatorThread) -> None:
        self.sim = simulator
        self.thread = thread
        self.url = thread.url

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.thread.call(lambda: fn(*args, **kwargs))

    def state(self) -> dict[str, Any]:
        return dict(self.thread.call(self.sim.state))


@contextlib.contextmanager
def serving(**options: Any) -> Iterator[Sim]:
    """A running EC2 simulator with ``options``."""
    simulator = EC2Simulator(**options)
    thread = SimulatorThread(simulator)
    thread.start()
    try:
        yield Sim(simulator, thread)
    finally:
        thread.stop()


@pytest.fixture
def sim() -> Iterator[Sim]:
    with serving() as running:
        yield running


class Events:
    """Everything a watcher emits, in order, for assertions."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.log: list[tuple[str, Any]] = []
        watcher.add_listener(lambda event, data: self.log.append((event, data)))

    def of(self, event: str) -> list[Any]:
        return [data for name, data in self.log if name == event]

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; events so far: {self.log[-10:]}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def watching(url: str, **options: Any) -> AsyncIterator[tuple[Watcher, Events]]:
    """A started watcher running one EC2 source (fast intervals) against ``url``."""
    source = EC2Source(url=url, **{**FAST, **options})
    watcher = Watcher([source], mark=False)
    events = Events(watcher)
    async with watcher:
        yield watcher, events


@pytest.fixture
async def watch(sim: Sim) -> AsyncIterator[tuple[Watcher, Events]]:
    async with watching(sim.url) as pair:
        yield pair


# --------------------------------------------------------------------- notices


@pytest.mark.parametrize("kind", ["terminate", "stop"])
async def test_spot_notice_with_its_deadline(sim: Sim, watch: Any, kind: str) -> None:
    watcher, events = watch
    await events.until(lambda: len(events.of("poll_ok")) >= 8)
    assert not watcher.preempting and watcher.notices == []
    scheduled = sim.call(sim.sim.schedule, kind, after=0.2, lead=90)
    assert await watcher.wait_async(5)
    notice = watcher.notice
    assert notice is not None and notice.source == "ec2" and notice.kind == kind
    assert notice.deadline == parse_rfc3339(scheduled["time"])
    assert 85 < (notice.seconds_left() or 0) <= 90
    assert notice.raw == {"action": kind, "time": scheduled["time"]}
    assert watcher.health["ec2"].errors == 0


async def test_hibernate_starts_at_once(sim: Sim, watch: Any) -> None:
    watcher, _ = watch
    sim.call(sim.sim.schedule, "hibernate")
    assert await watcher.wait_async(5)
    assert watcher.notice is not None and watcher.notice.kind == "hibernate"
    assert watcher.notice.seconds_left() == 0
    assert watcher.notice.deadline is not None
    assert abs((watcher.notice.deadline - watcher.notice.detected_at).total_seconds()) < 1


async def test_repeated_polls_deliver_one_notice(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    sim.call(sim.sim.schedule, "terminate")
    assert await watcher.wait_async(5)
    seen = sim.state()["requests_by_path"]["GET /latest/meta-data/spot/instance-action"]
    await events.until(
        lambda: (
            sim.state()["requests_by_path"]["GET /latest/meta-data/spot/instance-action"]
            >= seen + 5
        )
    )
    assert [n.kind for n in watcher.notices] == ["terminate"]


async def test_rebalance_is_advisory_cleared_when_withdrawn_and_may_return(
    sim: Sim, watch: Any
) -> None:
    watcher, events = watch
    sim.call(sim.sim.schedule, "rebalance")
    await events.until(lambda: len(events.of("notice")) == 1)
    first = events.of("notice")[0]
    assert first.kind == "rebalance" and first.advisory and first.deadline is None
    assert not watcher.preempting
    sim.call(sim.sim.clear, "rebalance")
    await events.until(lambda: events.of("clear") == [("ec2", first.id)])
    sim.call(sim.sim.schedule, "rebalance", noticeTime="2030-01-01T00:00:00Z")
    await events.until(lambda: len(events.of("notice")) == 2)
    second = events.of("notice")[1]
    assert second.kind == "rebalance" and second.raw == {"noticeTime": "2030-01-01T00:00:00Z"}
    assert not watcher.preempting


async def test_scheduled_maintenance_then_cancelled(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    event = sim.call(sim.sim.schedule, "maintenance", lead=3600, code="instance-retirement")
    await events.until(lambda: len(events.of("notice")) == 1)
    notice = events.of("notice")[0]
    assert notice.kind == "maintenance" and notice.id == event["event_id"]
    assert notice.deadline == parse_event_date(event["not_before"])
    assert 3590 < (notice.seconds_left() or 0) <= 3600
    assert notice.raw["Code"] == "instance-retirement"
    assert not watcher.preempting  # an hour away: advisory for now
    assert sim.call(sim.sim.clear, "maintenance") == 1
    await events.until(lambda: events.of("clear") == [("ec2", event["event_id"])])
    listed = sim.state()["notices"][0]
    assert listed["state"] == "canceled"  # still listed by EC2, but no longer active
    await asyncio.sleep(0.3)
    assert len(events.of("notice")) == 1 and not watcher.preempting


async def test_maintenance_event_that_vanishes_is_cleared(sim: Sim, watch: Any) -> None:
    _, events = watch
    first = sim.call(sim.sim.schedule, "maintenance", lead=7200)
    second = sim.call(sim.sim.schedule, "maintenance", lead=9000)
    await events.until(lambda: len(events.of("notice")) == 2)
    assert {n.id for n in events.of("notice")} == {first["event_id"], second["event_id"]}
    assert sim.call(sim.sim.clear, "maintenance", state="removed") == 2
    await events.until(lambda: len(events.of("clear")) == 2)
    assert set(events.of("clear")) == {("ec2", first["event_id"]), ("ec2", second["event_id"])}
    assert sim.state()["notices"] == []


async def test_completed_maintenance_is_cleared_and_near_one_counts(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    done = sim.call(sim.sim.schedule, "maintenance", lead=7200)
    await events.until(lambda: len(events.of("notice")) == 1)
    sim.call(sim.sim.clear, "maintenance", state="completed")
    await events.until(lambda: events.of("clear") == [("ec2", done["event_id"])])
    near = sim.call(sim.sim.schedule, "maintenance", lead=300, code="system-reboot")
    assert await watcher.wait_async(5)  # within the watcher's 600 s maintenance lead
    assert watcher.notice is not None and watcher.notice.id == near["event_id"]


async def test_auto_scaling_termination() -> None:
    key = "GET /latest/meta-data/autoscaling/target-lifecycle-state"
    with serving(in_asg=True) as sim:
        async with watching(sim.url) as (watcher, events):
            await events.until(lambda: sim.state()["requests_by_path"].get(key, 0) >= 3)
            assert watcher.notices == []  # InService
            sim.call(sim.sim.schedule, "asg-terminated")
            assert await watcher.wait_async(5)
    assert watcher.notice is not None and watcher.notice.kind == "terminate"
    assert watcher.notice.raw == {"target-lifecycle-state": "Terminated"}


async def test_on_demand_instance_skips_spot_only_endpoints() -> None:
    with serving(life_cycle="on-demand", in_asg=True) as sim:
        async with watching(sim.url) as (watcher, events):
            await events.until(lambda: len(events.of("poll_ok")) >= 10)
            sim.call(sim.sim.schedule, "asg-terminated")
            assert await watcher.wait_async(5)
        read = sim.state()["requests_by_path"]
    assert "GET /latest/meta-data/spot/instance-action" not in read
    assert "GET /latest/meta-data/events/recommendations/rebalance" not in read
    assert read["GET /latest/meta-data/events/maintenance/scheduled"] >= 5
    assert watcher.notice is not None and watcher.notice.kind == "terminate"


async def test_nothing_scheduled_is_quiet(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    await events.until(lambda: len(events.of("poll_ok")) >= 20)
    assert watcher.notices == [] and watcher.health["ec2"].errors == 0
    statuses = sim.state()["statuses"]
    assert statuses["404"] > 0 and set(statuses) <= {"200", "404"}


# ---------------------------------------------------------------------- tokens


async def test_token_expiring_mid_run_is_renewed_before_it_is_refused() -> None:
    with serving(max_token_ttl=1.0) as sim:
        async with watching(sim.url) as (watcher, events):
            # A 1 s token is renewed with half its life left, before EC2 would refuse it.
            await events.until(lambda: sim.state()["tokens_issued"] >= 4)
            state = sim.state()
            assert "401" not in state["statuses"]
            assert watcher.health["ec2"].errors == 0
            sim.call(sim.sim.schedule, "terminate")
            assert await watcher.wait_async(5)


async def test_refused_token_is_renewed_once_and_the_read_retried(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    await events.until(lambda: len(events.of("poll_ok")) >= 4)
    issued = sim.state()["tokens_issued"]
    sim.call(sim.sim.revoke_tokens)  # e.g. the instance was stopped and started
    sim.call(sim.sim.schedule, "terminate")
    assert await watcher.wait_async(5)
    state = sim.state()
    assert state["statuses"]["401"] >= 1
    assert state["tokens_issued"] == issued + 1  # one renewal shared by every monitor
    assert watcher.health["ec2"].errors == 0  # the retry succeeded: no failed poll


async def test_persistent_401_is_an_error_that_is_retried(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    await events.until(lambda: len(events.of("poll_ok")) >= 4)
    sim.call(sim.sim.fault, 401, count=20)
    await events.until(lambda: len(events.of("poll_error")) >= 1)
    _, error = events.of("poll_error")[0]
    assert isinstance(error, SourceError) and "401" in str(error)
    sim.call(sim.sim.schedule, "terminate")
    assert await watcher.wait_async(8)
    assert watcher.notice is not None and watcher.notice.kind == "terminate"


# ---------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("status", "message"),
    [(403, "disabled"), (500, "HTTP 500"), (503, "HTTP 503")],
)
async def test_http_errors_are_logged_retried_and_survived(
    sim: Sim, watch: Any, status: int, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    watcher, events = watch
    caplog.set_level(logging.WARNING, logger="preemptwatch.sources")
    await events.until(lambda: len(events.of("poll_ok")) >= 4)
    sim.call(sim.sim.fault, status, count=4)
    await events.until(lambda: len(events.of("poll_error")) >= 2)
    errors = [e for _, e in events.of("poll_error")]
    assert all(isinstance(e, SourceError) and message in str(e) for e in errors)
    assert message in caplog.text
    sim.call(sim.sim.schedule, "stop")
    assert await watcher.wait_async(8)
    assert watcher.notice is not None and watcher.notice.kind == "stop"
    assert watcher.health["ec2"].running


async def test_read_timeout_is_an_error_not_a_hang(sim: Sim) -> None:
    async with watching(sim.url, timeout=0.3) as (watcher, events):
        await events.until(lambda: len(events.of("poll_ok")) >= 4)
        sim.call(sim.sim.fault, mode="timeout", method="GET")
        await events.until(lambda: len(events.of("poll_error")) >= 1)
        _, error = events.of("poll_error")[0]
        assert "no answer" in str(error) and "0.3s" in str(error)
        sim.call(sim.sim.schedule, "terminate")
        assert await watcher.wait_async(5)


async def test_token_put_timeout_names_the_hop_limit(
    sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="preemptwatch.sources")
    # The first dropped token request is the source's start-up read of the life cycle.
    sim.call(sim.sim.fault, mode="timeout", method="PUT", count=2)
    async with watching(sim.url, timeout=0.3) as (watcher, events):
        await events.until(lambda: len(events.of("poll_error")) >= 1)
        _, error = events.of("poll_error")[0]
        assert "raise the hop limit to 2 or use host networking" in str(error)
        assert "hop limit" in caplog.text
        sim.call(sim.sim.schedule, "terminate")
        assert await watcher.wait_async(5)


async def test_connection_resets_are_survived(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    await events.until(lambda: len(events.of("poll_ok")) >= 4)
    sim.call(sim.sim.fault, mode="reset", count=6)
    await events.until(lambda: len(events.of("poll_error")) >= 1)
    assert sim.state()["statuses"]["0"] >= 2
    sim.call(sim.sim.schedule, "terminate")
    assert await watcher.wait_async(8)


async def test_garbage_bodies_are_errors_never_notices(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    await events.until(lambda: len(events.of("poll_ok")) >= 4)
    sim.call(sim.sim.fault, mode="garbage", count=12)
    rebalance = sim.call(sim.sim.schedule, "rebalance")
    maintenance = sim.call(sim.sim.schedule, "maintenance", lead=3600)
    await events.until(lambda: len(events.of("poll_error")) >= 3)
    await events.until(lambda: not sim.state()["faults"])
    sim.call(sim.sim.schedule, "terminate")
    await events.until(lambda: len(watcher.notices) == 3, timeout=8)
    await asyncio.sleep(0.2)
    by_kind = {n.kind: n for n in watcher.notices}
    assert len(watcher.notices) == 3 and set(by_kind) == {"rebalance", "maintenance", "terminate"}
    assert by_kind["rebalance"].raw == {"noticeTime": rebalance["noticeTime"]}
    assert by_kind["maintenance"].id == maintenance["event_id"]
    assert by_kind["terminate"].raw["action"] == "terminate"
    assert all("malformed" in str(e) or "lifecycle" in str(e) for _, e in events.of("poll_error"))


async def test_unparsable_times_are_errors_never_notices(sim: Sim, watch: Any) -> None:
    watcher, events = watch
    sim.call(sim.sim.schedule, "terminate", time="in two minutes")
    sim.call(sim.sim.schedule, "maintenance", not_before="2019-01-21 09:00:43")
    await events.until(lambda: len({str(e) for _, e in events.of("poll_error")}) >= 2)
    messages = {str(e) for _, e in events.of("poll_error")}
    assert any("not an RFC 3339 time with a UTC offset: 'in two minutes'" in m for m in messages)
    assert any("not an EC2 event date" in m for m in messages)
    assert watcher.notices == [] and not watcher.preempting
    sim.call(sim.sim.schedule, "terminate")  # replaces the bad one
    assert await watcher.wait_async(8)


class _Sink:
    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.cleared: list[tuple[str, str]] = []

    def notice(self, notice: Notice) -> None:
        self.notices.append(notice)

    def clear(self, source: str, notice_id: str) -> None:
        self.cleared.append((source, notice_id))

    def poll_ok(self, source: str) -> None:
        pass

    def poll_error(self, source: str, error: BaseException) -> None:
        pass


async def serve_fixed(path: str, body: str) -> Any:
    """A metadata service that hands out tokens and serves ``body`` at ``path`` only."""
    from aiohttp import web

    from preemptwatch.simulate import serve

    async def token(request: web.Request) -> web.Response:
        return web.Response(text="tok", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})

    async def value(request: web.Request) -> web.Response:
        assert request.headers["X-aws-ec2-metadata-token"] == "tok"
        return web.Response(text=body)

    app = web.Application()
    app.router.add_put("/latest/api/token", token)
    app.router.add_get(f"/latest/meta-data/{path}", value)
    return await serve(app)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("spot/instance-action", '{"action": "terminate"}', "not an RFC 3339 time .*None"),
        ("spot/instance-action", '{"action": "explode", "time": "2030-01-01T00:00:00Z"}', "action"),
        ("spot/instance-action", '["terminate"]', "expected a JSON object"),
        ("spot/instance-action", '{"action": "stop", "time": "2030-01-01T00:00:00"}', "offset"),
        ("spot/instance-action", '{"action": "stop", "time": "2030-02-30T00:00:00Z"}', "RFC"),
        ("spot/instance-action", "", "malformed JSON"),
        ("events/recommendations/rebalance", "{}", "noticeTime"),
        ("events/recommendations/rebalance", '{"noticeTime": 5}', "RFC 3339"),
        ("events/maintenance/scheduled", '{"EventId": "x"}', "expected a JSON array"),
        ("events/maintenance/scheduled", '[{"State": "active"}]', "without EventId"),
        ("events/maintenance/scheduled", "[1]", "expected event objects"),
        (
            "events/maintenance/scheduled",
            '[{"EventId": "e", "State": "active", "NotBefore": "21 Foo 2019 09:00:43 GMT"}]',
            "not an EC2 event date",
        ),
        ("autoscaling/target-lifecycle-state", "<html>oops</html>", "not a lifecycle state"),
    ],
)
async def test_malformed_bodies_raise_clear_errors(path: str, body: str, message: str) -> None:
    runner = await serve_fixed(path, body)
    source = EC2Source(url=f"http://127.0.0.1:{runner.addresses[0][1]}")
    sink = _Sink()
    checks = {
        "spot/instance-action": source.check_spot,
        "events/recommendations/rebalance": source.check_rebalance,
        "events/maintenance/scheduled": source.check_maintenance,
        "autoscaling/target-lifecycle-state": source.check_asg,
    }
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(SourceError, match=message):
                await checks[path](SourceContext(sink=sink, session=session))
    finally:
        await runner.cleanup()
    assert sink.notices == [] and sink.cleared == []


def test_time_parsers() -> None:
    assert parse_event_date("21 Jan 2019 09:00:43 GMT").isoformat() == "2019-01-21T09:00:43+00:00"
    assert parse_event_date("1 Feb 2030 00:00:00 GMT").day == 1
    assert parse_rfc3339("2017-09-18T08:22:00Z").isoformat() == "2017-09-18T08:22:00+00:00"
    assert parse_rfc3339("2017-09-18T10:22:00+02:00").hour == 8
    for bad in ("2019-01-21", "21 January 2019 09:00:43 GMT", "", None):
        with pytest.raises(ValueError):
            parse_event_date(bad)
    with pytest.raises(ValueError):
        parse_rfc3339("18 Sep 2017")


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="token_ttl"):
        EC2Source(token_ttl=0)
    with pytest.raises(ValueError, match="token_ttl"):
        EC2Source(token_ttl=21601)
    with pytest.raises(ValueError, match="positive"):
        EC2Source(interval=0)
    with pytest.raises(ValueError, match="slow_interval"):
        EC2Source(slow_interval=-1)
    with pytest.raises(ValueError, match="must look like http://"):
        EC2Source(url="169.254.169.254")


# ------------------------------------------------- detection and configuration


async def test_detect_and_instance_id(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", sim.url)
    async with aiohttp.ClientSession() as session:
        assert await EC2Source.detect(session) is True
        assert await EC2Source.fetch_instance_id(session) == "i-0123456789abcdef0"
    assert make_source("ec2").url == sim.url  # type: ignore[attr-defined]


async def test_detect_through_a_hop_limit_of_one(
    sim: Sim, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", sim.url)
    sim.call(sim.sim.fault, mode="timeout", method="PUT")
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        assert await EC2Source.detect(session) is True
        assert time.monotonic() - started < 1.0
    assert "raise the hop limit to 2 or use host networking" in caplog.text


async def test_detect_is_false_quickly_where_there_is_no_ec2(
    monkeypatch: pytest.MonkeyPatch, unused_tcp_port: int
) -> None:
    monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", f"http://127.0.0.1:{unused_tcp_port}")
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        assert await EC2Source.detect(session) is False
        assert await EC2Source.fetch_instance_id(session) is None
        assert time.monotonic() - started < 1.0
        monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", "169.254.169.254")
        assert await EC2Source.detect(session) is False
        assert await EC2Source.fetch_instance_id(session) is None


async def test_detect_is_false_against_another_metadata_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiohttp import web

    from preemptwatch.simulate import serve

    async def not_ec2(request: web.Request) -> web.Response:
        return web.Response(status=404 if request.method == "GET" else 405)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", not_ec2)
    runner = await serve(app)
    try:
        port = runner.addresses[0][1]
        monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as session:
            assert await EC2Source.detect(session) is False
    finally:
        await runner.cleanup()


async def test_watcher_detects_ec2_and_watches_it(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", sim.url)
    sim.call(sim.sim.schedule, "terminate", lead=60)
    async with Watcher(detect=["ec2"], mark=False) as watcher:
        assert await watcher.wait_async(5)
    assert [s.name for s in watcher.sources] == ["ec2"]
    assert watcher.notice is not None
    assert watcher.notice.deadline is not None
    assert watcher.notice.deadline - utcnow() < timedelta(seconds=61)
