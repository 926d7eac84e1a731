"""The watcher core, with a scripted in-process source (the real sources have their own
tests against the simulators)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import pytest

from preemptwatch import Notice, Watcher
from preemptwatch.notice import utcnow
from preemptwatch.sources.base import PollingSource, Source, SourceContext


class Scripted(Source):
    """Emits the notices it is given, then idles."""

    name = "ec2"

    def __init__(self, *notices: Notice, crash_first: int = 0) -> None:
        self.notices = notices
        self.crash_first = crash_first
        self.runs = 0

    async def run(self, ctx: SourceContext) -> None:
        self.runs += 1
        if self.runs <= self.crash_first:
            raise RuntimeError("boom")
        for n in self.notices:
            ctx.sink.notice(n)
        await asyncio.Event().wait()


async def test_first_counting_notice_wins_and_duplicates_are_dropped() -> None:
    seen: list[Notice] = []
    a = Notice("ec2", "terminate", id="a")
    b = Notice("ec2", "stop", id="b")
    async with Watcher([Scripted(a, a, b)], [seen.append]) as w:
        assert await w.wait_async(2)
        await asyncio.sleep(0.05)
    assert w.preempting and w.notice == a
    assert [n.id for n in w.notices] == ["a", "b"]
    assert seen == [a]


async def test_rebalance_is_advisory_unless_counted() -> None:
    reb = Notice("ec2", "rebalance", id="r")
    advisories: list[Notice] = []
    async with Watcher([Scripted(reb)], on_advisory=advisories.append) as w:
        assert not await w.wait_async(0.2)
    assert not w.preempting and w.notices == [reb] and advisories == [reb]
    async with Watcher([Scripted(reb)], count_rebalance=True) as w:
        assert await w.wait_async(1)


async def test_far_maintenance_is_promoted_at_lead_time_unless_cleared() -> None:
    soon = Notice("azure", "maintenance", id="m", deadline=utcnow() + timedelta(seconds=1.3))
    async with Watcher([Scripted(soon)], maintenance_lead=1.0) as w:
        assert not await w.wait_async(0.1)
        assert await w.wait_async(2)
    later = Notice("azure", "maintenance", id="m", deadline=utcnow() + timedelta(seconds=1.3))
    async with Watcher([Scripted(later)], maintenance_lead=1.0) as w:
        await asyncio.sleep(0.05)
        w.notice_cleared("azure", "m")
        assert not await w.wait_async(0.6)


async def test_crashing_source_is_restarted() -> None:
    src = Scripted(Notice("ec2", "terminate", id="x"), crash_first=1)
    async with Watcher([src]) as w:
        assert await w.wait_async(5)
    assert src.runs == 2
    assert w.health["ec2"].errors == 1


async def test_callbacks_in_order_errors_contained_and_bounded_by_deadline() -> None:
    order: list[str] = []

    def failing(n: Notice) -> None:
        order.append("failing")
        raise ValueError("user bug")

    async def slow(n: Notice) -> None:
        order.append("slow")
        await asyncio.sleep(10)

    def last(n: Notice) -> None:
        order.append("last")

    n = Notice("ec2", "terminate", id="t", deadline=utcnow() + timedelta(seconds=0.3))
    async with Watcher([Scripted(n)], [failing, slow, last]) as w:
        await w.wait_async(1)
        for _ in range(100):
            if "last" in order:
                break
            await asyncio.sleep(0.02)
    assert order == ["failing", "slow", "last"]


class FlakyPoll(PollingSource):
    name = "gcp"
    interval = 0.01
    max_backoff = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def poll(self, ctx: SourceContext) -> None:
        self.calls += 1
        if self.calls < 4:
            raise OSError("metadata server hiccup")
        ctx.sink.notice(Notice("gcp", "preempt", id="p"))


async def test_polling_source_retries_with_backoff() -> None:
    src = FlakyPoll()
    async with Watcher([src]) as w:
        assert await w.wait_async(3)
    assert w.health["gcp"].errors == 3 and w.health["gcp"].polls >= 1


def test_thread_runner_for_sync_scripts() -> None:
    got = threading.Event()
    w = Watcher([Scripted(Notice("ec2", "terminate", id="z"))], [lambda n: got.set()])
    w.start_in_thread()
    try:
        assert w.wait(3) and w.preempting
        assert got.wait(3)
    finally:
        w.stop()
    assert not w.running


def test_notice_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="unknown notice kind"):
        Notice("ec2", "explode")
    n = Notice("ec2", "terminate", deadline=utcnow() + timedelta(seconds=100), raw={"a": 1})
    back = Notice.from_dict(n.to_dict())
    assert back.key == n.key and back.deadline == n.deadline
    assert 99 < (n.seconds_left() or 0) <= 100
    with pytest.raises(ValueError):
        Notice.from_dict({"kind": "terminate"})


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, preemptwatch; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_notices_reported_before_the_loop_runs_are_kept() -> None:
    """A signal can arrive between installing handlers and the loop running."""
    w = Watcher()
    early = Notice("signal", "signal", raw={"signal": "SIGTERM"})
    w.notice_threadsafe(early)
    w.start_in_thread(wait=5)
    try:
        assert w.wait(3) and w.notice == early
    finally:
        w.stop()


def test_stop_right_after_start_in_thread_stops_the_thread() -> None:
    w = Watcher([Scripted()])
    w.start_in_thread()  # returns before the loop runs
    assert w.running
    w.stop()
    assert not w.running
    assert w._thread is not None and not w._thread.is_alive()


def test_stop_right_after_the_callback_ran_is_prompt() -> None:
    """Stopping while the dispatcher is just getting the callback's result back (where
    Python 3.11's wait_for can swallow the cancellation) must not hang."""
    deadline = utcnow() + timedelta(seconds=60)  # wait_for with a timeout: the racy path
    for i in range(10):
        called = threading.Event()
        source = Scripted(Notice("ec2", "terminate", id=f"n{i}", deadline=deadline))
        w = Watcher([source], [lambda n, called=called: called.set()])  # type: ignore[misc]
        w.start_in_thread(wait=5)
        assert called.wait(3)
        t0 = time.monotonic()
        w.stop()
        assert time.monotonic() - t0 < 1.0
        assert w._thread is not None and not w._thread.is_alive()


def test_thread_switching_is_quickened_only_until_the_callback_runs() -> None:
    import sys

    from preemptwatch.watcher import BOOST_SWITCH_INTERVAL

    before = sys.getswitchinterval()
    seen: list[float] = []
    w = Watcher(callbacks=[lambda n: seen.append(sys.getswitchinterval())])
    w.notice_threadsafe(Notice("signal", "signal", raw={"signal": "SIGTERM"}))
    assert sys.getswitchinterval() == BOOST_SWITCH_INTERVAL
    w.start_in_thread()
    try:
        assert w.wait_handled(3)
    finally:
        w.stop()
    assert seen == [before] and sys.getswitchinterval() == before
