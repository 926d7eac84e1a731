"""Marking every run of this instance preempting on the server, without losing a mark.

Each mark is written to a spool directory (``mark-*.json``) before the first attempt and
removed once the server took it. Attempts go through `ApiClient.mark_instance_preempting`
and are retried with jittered backoff: quickly while the notice's deadline lasts, then
about every half minute, until the server answers or the sidecar stops. A sidecar that
starts again delivers what is left. The sidecar also delivers marks that run clients
spooled (``run-mark-*.json``, see `preemptwatch.client.spool`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from ..client.api import ApiClient
from ..client.spool import deliver_spool, write_atomic
from ..errors import ApiError, ApiUnavailable
from ..notice import Notice, body_hash
from .credentials import TokenSource
from .threads import in_daemon_thread

log = logging.getLogger("preemptwatch.sidecar")

#: Seconds each HTTP attempt (inside `ApiClient`) may take and retry before we back off.
ATTEMPT_BUDGET = 3.0


class InstanceMarker:
    """``POST /api/v1/instances/{instance_id}/preempting`` on ``server``, spooled."""

    def __init__(
        self,
        server: str,
        token: TokenSource,
        instance_id: str,
        spool_dir: Path,
        *,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
        on_done: Callable[[bool, Notice], None] | None = None,
    ) -> None:
        if not instance_id:
            raise ValueError("an instance ID is needed to mark this instance's runs")
        self.server = ApiClient(server).server  # validates the URL
        self.token = token
        self.instance_id = instance_id
        self.spool_dir = Path(spool_dir)
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.on_done = on_done
        #: Run IDs the server reported marked, per delivered spool file name.
        self.delivered: dict[str, list[str]] = {}
        self._client: ApiClient | None = None

    async def client(self) -> ApiClient:
        """An `ApiClient` with the current token (a new one when the token changed)."""
        token = await self.token()
        if self._client is None or self._client.api_key != token:
            if self._client is not None:
                await in_daemon_thread(self._client.close)
            self._client = ApiClient(
                self.server, token, timeout=self.timeout, retry_budget=ATTEMPT_BUDGET
            )
        return self._client

    def spool(self, notice: Notice) -> Path:
        """Write the pending mark for ``notice`` to the spool; returns its file."""
        name = f"mark-{body_hash([self.server, self.instance_id, notice.source, notice.id])}.json"
        path = self.spool_dir / name
        record = {
            "server": self.server,
            "instance_id": self.instance_id,
            "notice": notice.to_dict(),
        }
        write_atomic(path, record)
        return path

    def pending(self) -> list[Path]:
        """Spooled instance marks not yet delivered, oldest first."""
        found = []
        for path in self.spool_dir.glob("mark-*.json") if self.spool_dir.is_dir() else ():
            try:
                found.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # delivered meanwhile
                continue
        return [path for _, path in sorted(found)]

    async def mark(self, notice: Notice) -> bool:
        """Spool, then deliver ``notice``'s mark; True once the server took it."""
        return await self.deliver(self.spool(notice), notice)

    async def deliver_pending(self) -> None:
        """Deliver every spooled instance mark for this server, then the run clients'
        spooled run marks (run at start-up)."""
        for path in self.pending():
            try:
                record = json.loads(path.read_text())
                notice = Notice.from_dict(record["notice"])
                server, instance_id = str(record["server"]), str(record["instance_id"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("spooled mark %s is unreadable (left in place): %s", path, exc)
                continue
            if server == self.server:
                await self.deliver(path, notice, instance_id)
        await self.deliver_run_marks()

    async def deliver_run_marks(self) -> int:
        """Deliver run marks spooled by run clients in the same directory."""
        try:
            client = await self.client()
            return await in_daemon_thread(deliver_spool, client, self.spool_dir)
        except Exception as exc:  # never let a bad file stop the sidecar
            log.error("delivering spooled run marks failed: %s", exc)
            return 0

    async def deliver(self, path: Path, notice: Notice, instance_id: str | None = None) -> bool:
        """Deliver one spooled mark, retrying until done, refused, or cancelled."""
        target = instance_id or self.instance_id
        loop = asyncio.get_running_loop()
        left = notice.seconds_left()
        fast_until = loop.time() + (left if left is not None else 120.0)
        fast = wait_random_exponential(multiplier=0.1, max=2.0)
        slow = wait_random_exponential(multiplier=1.0, max=self.max_backoff)

        def wait(state: Any) -> float:
            return float(fast(state) if loop.time() < fast_until else slow(state))

        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception() if state.outcome else None
            n = state.attempt_number
            if n == 1 or n % 20 == 0:
                log.warning("marking instance %s failed (attempt %d): %s; retrying", target, n, exc)

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(ApiUnavailable),
                wait=wait,
                before_sleep=before_sleep,
                reraise=True,
            ):
                with attempt:
                    try:
                        client = await self.client()
                    except Exception as exc:
                        raise ApiUnavailable(f"no credentials for the server: {exc}") from exc
                    marked = await in_daemon_thread(client.mark_instance_preempting, target, notice)
        except ApiError as exc:
            log.error(
                "server refused the mark of instance %s: %s; it stays in %s", target, exc, path
            )
            self._done(False, notice)
            return False
        path.unlink(missing_ok=True)
        self.delivered[path.name] = marked
        log.warning("marked %d run(s) of instance %s preempting: %s", len(marked), target, marked)
        self._done(True, notice)
        return True

    def close(self) -> None:
        """Close the HTTP session."""
        if self._client is not None:
            self._client.close()

    def _done(self, ok: bool, notice: Notice) -> None:
        if self.on_done is not None:
            self.on_done(ok, notice)
