"""Sidecar benchmark: how soon after detection a long-poll of ``GET /v1/notice`` answers.

Runs the sidecar on its own event loop in a thread of this process, with a source fired
by hand; the clients run on the main loop. It holds ``--clients``
long-polls open (``?wait=60&after=VERSION``) and reports ``--notices`` advisory notices
one after another; each poll's latency is the time from the notice's detection (its
monotonic timestamp) to the client having the whole answer. Then the first notice that
counts, for plain ``?wait=60`` polls. Prints p50 / p99 / max per client count.

    python benchmarks/sidecar_longpoll.py
    python benchmarks/sidecar_longpoll.py --clients 1 10 100 --notices 50
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import threading
import time
from datetime import timedelta

import aiohttp

from preemptwatch.notice import Notice, utcnow
from preemptwatch.sidecar import Sidecar, SidecarConfig
from preemptwatch.sources.base import Source, SourceContext


class Manual(Source):
    """Reports what the benchmark gives it."""

    name = "ec2"

    def __init__(self) -> None:
        self.ctx: SourceContext | None = None
        self.ready = asyncio.Event()

    async def run(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.ready.set()
        await asyncio.Event().wait()


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):6.2f} ms  p99 {p99:6.2f} ms  max {ms[-1]:6.2f} ms"


async def poll(session: aiohttp.ClientSession, url: str, **params: str) -> tuple[float, dict]:
    async with session.get(url, params=params) as resp:
        body = await resp.json()
    return time.monotonic(), body


class SidecarThread:
    """The sidecar on its own loop in a daemon thread."""

    def __init__(self) -> None:
        self.source = Manual()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sidecar = Sidecar(SidecarConfig(sources=[self.source], port=0, instance_id="i-b"))

    def __enter__(self) -> SidecarThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sidecar.start(), self.loop).result(10)
        asyncio.run_coroutine_threadsafe(self.source.ready.wait(), self.loop).result(10)
        return self

    def report(self, notice: Notice) -> None:
        assert self.source.ctx is not None
        self.loop.call_soon_threadsafe(self.source.ctx.sink.notice, notice)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def measure(clients: int, notices: int) -> tuple[list[float], list[float]]:
    with SidecarThread() as side:
        sc = side.sidecar
        url = f"{sc.url}/v1/notice"
        advisory: list[float] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(notices):
                version = sc.board.version
                polls = [
                    asyncio.ensure_future(poll(session, url, wait="60", after=str(version)))
                    for _ in range(clients)
                ]
                await asyncio.sleep(0.05 + clients * 0.001)  # let every poll arrive
                notice = Notice("ec2", "rebalance", id=f"r{i}", raw={"n": i})
                side.report(notice)
                for done_at, _ in await asyncio.gather(*polls):
                    advisory.append(done_at - notice.detected_monotonic)
            polls = [asyncio.ensure_future(poll(session, url, wait="60")) for _ in range(clients)]
            await asyncio.sleep(0.05 + clients * 0.001)
            final = Notice("ec2", "terminate", deadline=utcnow() + timedelta(minutes=2), id="t")
            side.report(final)
            first = [done - final.detected_monotonic for done, _ in await asyncio.gather(*polls)]
    return advisory, first


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--notices", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"long-poll answer latency after detection ({args.notices} notices each)")
    for clients in args.clients:
        advisory, first = await measure(clients, args.notices)
        print(f"  {clients:4d} client(s), versioned polls: {summary(advisory)}")
        print(f"  {clients:4d} client(s), first counting notice: {summary(first)}")


if __name__ == "__main__":
    asyncio.run(main())
