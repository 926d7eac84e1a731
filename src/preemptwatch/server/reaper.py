"""The reaper: a background task that runs `RunStore.reap` every few seconds."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from .background import BackgroundTask
from .metrics import Metrics
from .store import ReapResult, RunStore

log = logging.getLogger("preemptwatch.server.reaper")


class Reaper:
    """Runs a reaper pass every ``interval`` seconds (±10 % jitter, so replicas spread
    out). A failed pass is logged and retried at the next interval; it never stops."""

    def __init__(self, store: RunStore, interval: float, metrics: Metrics | None = None) -> None:
        self.store = store
        self.interval = interval
        self.metrics = metrics
        self._task = BackgroundTask("reaper", self._loop)

    async def run_once(self, now: float | None = None) -> ReapResult:
        """One pass (``now`` injectable for tests)."""
        started = time.perf_counter()
        result = await self.store.reap(now)
        if self.metrics is not None:
            self.metrics.reap_seconds.observe(time.perf_counter() - started)
            self.metrics.reaped.labels("preempted").inc(len(result.preempted))
            self.metrics.reaped.labels("crashed").inc(len(result.crashed))
            self.metrics.queued.inc(len(result.queued))
        if result.reaped:
            log.info(
                "reaped %d preempted and %d crashed runs; queued %d",
                len(result.preempted),
                len(result.crashed),
                len(result.queued),
            )
        return result

    def start(self) -> None:
        """Start the periodic task."""
        self._task.start()

    async def stop(self) -> None:
        """Stop the periodic task."""
        await self._task.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))
            try:
                await self.run_once()
            except Exception:
                log.exception("reaper pass failed; retrying in %.1f s", self.interval)
