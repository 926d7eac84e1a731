"""The ``sidecar`` source: learn of notices from ``preemptwatch watch`` on this machine.

It long-polls the sidecar's ``GET /v1/notice?wait=...&after=VERSION``, so a process in a
container needs no route to the metadata service. The notices it reports are the
sidecar's own, unchanged: ``Notice.source`` stays the provider that saw it (``ec2``,
``gcp``, ``azure``, ...), with the same kind, ID, deadline and detection time, so a
notice seen both directly and through the sidecar counts once. Advisory notices and
their clearing are relayed too; the local watcher applies its own policy to them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from ..notice import Notice
from .base import Source, SourceContext, SourceError

log = logging.getLogger("preemptwatch.sources")

ENV_URL = "PREEMPTWATCH_SIDECAR_URL"


class SidecarSource(Source):
    """Long-polls the sidecar at ``url`` (default ``PREEMPTWATCH_SIDECAR_URL``)."""

    name = "sidecar"

    def __init__(
        self,
        url: str | None = None,
        wait: float = 30.0,
        interval: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        url = url or os.environ.get(ENV_URL, "")
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"sidecar URL must be set (argument or {ENV_URL}) and start with http://, "
                f"not {url!r}"
            )
        if not 0 < wait <= 300 or interval <= 0:
            raise ValueError("wait must be in (0, 300] seconds and interval positive")
        self.url = url.rstrip("/")
        self.wait = wait
        self.interval = interval
        self.max_backoff = max_backoff
        self.version: int | None = None
        self._reported: set[tuple[str, str]] = set()

    @classmethod
    async def detect(cls, session: aiohttp.ClientSession) -> bool:
        return bool(os.environ.get(ENV_URL))

    async def poll(self, ctx: SourceContext) -> None:
        """One (long) request; reports what changed."""
        params: dict[str, str] = {"wait": "0"}
        if self.version is not None:
            params = {"wait": f"{self.wait:g}", "after": str(self.version)}
        timeout = aiohttp.ClientTimeout(total=self.wait + 10, sock_connect=2.0)
        try:
            async with ctx.session.get(
                f"{self.url}/v1/notice", params=params, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    raise SourceError(f"sidecar answered {resp.status}: {text}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SourceError(f"sidecar at {self.url} unreachable or garbled: {exc!r}") from exc
        self._apply(ctx, body)

    def _apply(self, ctx: SourceContext, body: Any) -> None:
        try:
            version = int(body["version"])
            notices = [Notice.from_dict(item) for item in body["notices"]]
            first = body.get("notice")
            if first:
                notices.append(Notice.from_dict(first))
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"sidecar sent a malformed answer: {exc!r}") from exc
        keys = {n.key for n in notices}
        for notice in notices:
            ctx.sink.notice(notice)
        for key in self._reported - keys:
            ctx.sink.clear(*key)
        self._reported = keys
        self.version = version

    async def run(self, ctx: SourceContext) -> None:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is None:
                return
            ctx.sink.poll_error(self.name, exc)
            n = state.attempt_number
            level = logging.WARNING if n == 1 or n % 30 == 0 else logging.DEBUG
            log.log(level, "sidecar: poll failed (attempt %d): %s", n, exc)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_random_exponential(multiplier=self.interval, max=self.max_backoff),
            before_sleep=before_sleep,
            reraise=True,
        )
        while True:
            async for attempt in retrying.copy():
                with attempt:
                    await self.poll(ctx)
            ctx.sink.poll_ok(self.name)
