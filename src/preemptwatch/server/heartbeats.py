"""Group commit for heartbeats: requests that arrive while one batch is being written wait
for the next, and each batch is one UPDATE. Every heartbeat is committed before it is
answered, yet the database sees one statement per batch, not per request."""

from __future__ import annotations

import asyncio
import logging

from .background import BackgroundTask
from .metrics import Metrics
from .store import RunKey, RunStore

log = logging.getLogger("preemptwatch.server.heartbeats")

#: Most heartbeats in one statement.
MAX_BATCH = 1000


class HeartbeatBatcher:
    """Collects heartbeats and writes them in batches."""

    def __init__(self, store: RunStore, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self._pending: list[tuple[RunKey, asyncio.Future[tuple[str, bool]]]] = []
        self._wake = asyncio.Event()
        self._task = BackgroundTask("heartbeat-batcher", self._run)

    def start(self) -> None:
        """Start the writer task (in the running loop)."""
        self._task.start()

    async def stop(self) -> None:
        """Stop the writer; heartbeats still waiting fail."""
        await self._task.stop()
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("the server is stopping"))
        self._pending.clear()

    async def beat(self, key: RunKey) -> tuple[str, bool]:
        """Record one heartbeat; returns the run's ``(state, preempting)``. Raises 404 for
        an unknown run and 409 for a stale incarnation."""
        if not self._task.running:
            raise RuntimeError("HeartbeatBatcher.start() was not called")
        fut: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((key, fut))
        self._wake.set()
        answer = await fut
        if answer[0] == "":
            return await self.store.explain_heartbeat(key)
        return answer

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                await self._write(batch)

    async def _write(self, batch: list[tuple[RunKey, asyncio.Future[tuple[str, bool]]]]) -> None:
        try:
            found = await self.store.heartbeat_many([key for key, _ in batch])
        except Exception as exc:  # the database is down: every waiter gets the error
            log.warning("writing %d heartbeats failed: %s", len(batch), exc)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        if self.metrics is not None:
            self.metrics.heartbeat_batch.observe(len(batch))
        for key, fut in batch:
            if not fut.done():
                fut.set_result(found.get(key, ("", False)))
