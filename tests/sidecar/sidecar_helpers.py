"""Helpers for the sidecar tests: a source the test fires by hand, and a webhook
receiver served over real HTTP."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from preemptwatch.notice import Notice
from preemptwatch.server.testing import free_port as free_port  # re-exported for the tests
from preemptwatch.sources.base import Source, SourceContext


class Trigger(Source):
    """A source that reports what the test gives it (the real sources have their own
    tests against the simulators; the end-to-end test uses the EC2 one)."""

    name = "ec2"

    def __init__(self) -> None:
        self.ctx: SourceContext | None = None
        self.started = asyncio.Event()

    async def run(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.started.set()
        await asyncio.Event().wait()

    async def fire(self, notice: Notice) -> None:
        await asyncio.wait_for(self.started.wait(), 5)
        assert self.ctx is not None
        self.ctx.sink.notice(notice)
        self.ctx.sink.poll_ok(self.name)

    async def clear(self, notice: Notice) -> None:
        assert self.ctx is not None
        self.ctx.sink.clear(notice.source, notice.id)


@dataclass
class Receiver:
    """A webhook endpoint: answers the queued statuses first, then 200."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    attempts: int = 0
    delay: float = 0.0
    got: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.bodies.append(await request.json())
            self.got.set()
        return web.json_response({"ok": status == 200}, status=status)
