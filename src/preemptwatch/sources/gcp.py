"""The GCP source: Spot/preemptible preemption and host maintenance on Compute Engine.

It watches ``instance/preempted`` and ``instance/maintenance-event`` side by side with the
metadata server's hanging GET: a plain GET gives the value and its ``ETag``, then each
``?wait_for_change=true&last_etag=E&timeout_sec=N`` returns as soon as the value changes,
so a notice is seen within milliseconds without polling.

- ``preempted`` TRUE -> ``preempt``, deadline now + 30 s on Spot/preemptible VMs (read from
  ``instance/scheduling``), now + 120 s on standard VMs (a standard shutdown);
- ``maintenance-event`` ``TERMINATE_ON_HOST_MAINTENANCE`` -> ``maintenance`` due 60 s ahead
  (it counts at once under the watcher's default policy);
- ``MIGRATE_ON_HOST_MAINTENANCE`` -> ``migrate``, advisory only: a live migration does not
  end the VM; it clears when the value is ``NONE``.

Every answer must carry ``Metadata-Flavor: Google``; one without it does not come from the
metadata server and is an error. Errors (503 during maintenance, timeouts, garbage) are
logged, reported to the sink, and retried with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp
from tenacity import RetryCallState

from ..notice import Notice, utcnow
from .base import Source, SourceContext, SourceError, backoff, retry_reporter
from .http import http_errors, quietly, read_body, run_together

log = logging.getLogger("preemptwatch.sources.gcp")

URL_ENV = "PREEMPTWATCH_GCP_METADATA_URL"
DEFAULT_URL = "http://169.254.169.254"
PREFIX = "/computeMetadata/v1/"
HEADERS = {"Metadata-Flavor": "Google"}
PREEMPTED = "instance/preempted"
MAINTENANCE = "instance/maintenance-event"
TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"
MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"
#: Soft-off to hard-off on Spot and preemptible VMs, and on standard VMs.
SPOT_GRACE = timedelta(seconds=30)
STANDARD_GRACE = timedelta(seconds=120)
#: ``maintenance-event`` changes this long before a terminating maintenance.
MAINTENANCE_NOTICE = timedelta(seconds=60)
DETECT_TIMEOUT = 1.0
MAX_BODY = 64 * 1024
_WORD = re.compile(r"[A-Z][A-Z0-9_]*")


def metadata_url(url: str | None = None) -> str:
    """The metadata server's root: ``url``, else ``PREEMPTWATCH_GCP_METADATA_URL``, else
    the link-local address (no DNS needed)."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


class GCPSource(Source):
    """Watches a Compute Engine VM's metadata for preemption and host maintenance.

    ``timeout_sec`` is the hanging GET's wait (the HTTP timeout is ``timeout_sec`` plus
    ``request_timeout``); ``interval`` is the base delay between retries after an error
    (the hanging GET needs no polling interval), capped at ``max_backoff``.
    """

    name = "gcp"

    def __init__(
        self,
        url: str | None = None,
        *,
        interval: float | None = None,
        timeout_sec: int = 30,
        request_timeout: float = 2.0,
        max_backoff: float = 30.0,
    ) -> None:
        if interval is not None and interval <= 0:
            raise ValueError("interval must be positive")
        if not isinstance(timeout_sec, int) or timeout_sec < 1:
            raise ValueError("timeout_sec must be a positive integer")
        if request_timeout <= 0 or max_backoff <= 0:
            raise ValueError("request_timeout and max_backoff must be positive")
        self.url = metadata_url(url)
        self.interval = interval if interval is not None else 0.5
        self.timeout_sec = timeout_sec
        self.request_timeout = request_timeout
        self.max_backoff = max_backoff
        #: Whether this is a Spot/preemptible VM; None until read (then 30 s is assumed).
        self.spot: bool | None = None
        self._values: dict[str, str] = {}

    # ------------------------------------------------------------------ probes

    @classmethod
    async def detect(cls, session: aiohttp.ClientSession, url: str | None = None) -> bool:
        """True when a GCP metadata server answers here (quick; never raises)."""
        return await quietly(cls._probe(session, "instance/id", url)) is not None

    @classmethod
    async def fetch_instance_id(
        cls, session: aiohttp.ClientSession, url: str | None = None
    ) -> str | None:
        """``instance/id``, or None when the metadata server does not answer."""
        return await quietly(cls._probe(session, "instance/id", url))

    @classmethod
    async def _probe(cls, session: aiohttp.ClientSession, key: str, url: str | None) -> str | None:
        async with session.get(
            metadata_url(url) + PREFIX + key,
            headers=HEADERS,
            timeout=aiohttp.ClientTimeout(total=DETECT_TIMEOUT),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200 or resp.headers.get("Metadata-Flavor") != "Google":
                return None
            text = (await read_body(resp, MAX_BODY)).decode("utf-8", "replace").strip()
            return text or None

    # ----------------------------------------------------------------- the watch

    async def run(self, ctx: SourceContext) -> None:
        """Watch both keys side by side (and read the VM's scheduling once) until cancelled."""
        await run_together(
            [
                self._read_scheduling(ctx.session),
                self._watch(ctx, PREEMPTED, {"TRUE", "FALSE"}.__contains__, self._on_preempted),
                self._watch(ctx, MAINTENANCE, _WORD.fullmatch, self._on_maintenance),
            ]
        )

    async def _watch(
        self,
        ctx: SourceContext,
        key: str,
        valid: Callable[[str], Any],
        handle: Callable[[SourceContext, str], None],
    ) -> None:
        """Plain GET, then hanging GETs following the ETag; errors retried with backoff."""
        retrying = backoff(self.interval, self.max_backoff, self._before_retry(ctx, key))
        tag: str | None = None
        while True:
            started = time.monotonic()
            async for attempt in retrying.copy():
                with attempt:
                    value, new_tag = await self._get(ctx.session, key, tag, valid)
            handle(ctx, value)
            ctx.sink.poll_ok(self.name)
            if new_tag == tag and time.monotonic() - started < self.interval:
                # A server that ignores wait_for_change must not make this a busy loop.
                await asyncio.sleep(self.interval)
            tag = new_tag

    async def _get(
        self,
        session: aiohttp.ClientSession,
        key: str,
        last_etag: str | None,
        valid: Callable[[str], Any],
    ) -> tuple[str, str]:
        """One GET of ``key`` (hanging when ``last_etag`` is given): (value, ETag)."""
        url = self.url + PREFIX + key
        if last_etag is None:
            params: dict[str, str] = {}
            total = self.request_timeout
        else:
            params = {
                "wait_for_change": "true",
                "last_etag": last_etag,
                "timeout_sec": str(self.timeout_sec),
            }
            total = self.timeout_sec + self.request_timeout
        with http_errors(url, total):
            async with session.get(
                url,
                params=params,
                headers=HEADERS,
                timeout=aiohttp.ClientTimeout(total=total),
                allow_redirects=False,
            ) as resp:
                if resp.headers.get("Metadata-Flavor") != "Google":
                    raise SourceError(
                        f"{url}: HTTP {resp.status} without 'Metadata-Flavor: Google': "
                        "not the GCP metadata server"
                    )
                body = await read_body(resp, MAX_BODY)
                if resp.status != 200:
                    hint = (
                        " (on GKE with Workload Identity the node's metadata is hidden from"
                        " pods: use host networking or the sidecar)"
                        if resp.status == 404
                        else ""
                    )
                    snippet = body[:200].decode("utf-8", "replace").strip()
                    raise SourceError(f"{url}: HTTP {resp.status}: {snippet}{hint}")
                tag = resp.headers.get("ETag")
        try:
            value = body.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SourceError(f"{url}: malformed answer {body[:40]!r}") from None
        if not valid(value):
            raise SourceError(f"{url}: unexpected value {value[:40]!r}")
        if not tag:
            raise SourceError(f"{url}: answer without an ETag")
        return value, tag

    def _before_retry(self, ctx: SourceContext, key: str) -> Callable[[RetryCallState], None]:
        message = "gcp %s failed (attempt %d, retry in %.1fs): %s"
        return retry_reporter(ctx, self.name, log, message, key)

    async def _read_scheduling(self, session: aiohttp.ClientSession) -> None:
        """Learn whether this is a Spot/preemptible VM (sets ``spot``); never raises."""

        async def read(key: str) -> str | None:
            try:
                value, _ = await self._get(session, key, None, _WORD.fullmatch)
            except SourceError as exc:
                if "HTTP 404" in str(exc):
                    return None  # key absent on this VM
                raise
            return value

        try:
            async for attempt in backoff(self.interval, self.max_backoff, attempts=5):
                with attempt:
                    model = await read("instance/scheduling/provisioning-model")
                    preemptible = await read("instance/scheduling/preemptible")
        except Exception as exc:
            log.warning("gcp: cannot read the VM's scheduling (assuming Spot, 30 s): %s", exc)
            return
        if model is None and preemptible is None:
            log.warning("gcp: the VM's scheduling is not exposed (assuming Spot, 30 s)")
            return
        self.spot = model == "SPOT" or preemptible == "TRUE"
        log.debug("gcp: provisioning model %s, preemptible %s", model, preemptible)

    # ------------------------------------------------------------------- values

    def _on_preempted(self, ctx: SourceContext, value: str) -> None:
        previous = self._values.get(PREEMPTED)
        self._values[PREEMPTED] = value
        if value == previous:
            return
        if value == "TRUE":
            now = utcnow()
            grace = STANDARD_GRACE if self.spot is False else SPOT_GRACE
            raw = {"preempted": value, "spot": self.spot}
            notice = Notice(
                self.name, "preempt", deadline=now + grace, detected_at=now, raw=raw, id="preempted"
            )
            ctx.sink.notice(notice)
        elif previous == "TRUE":
            ctx.sink.clear(self.name, "preempted")

    def _on_maintenance(self, ctx: SourceContext, value: str) -> None:
        previous = self._values.get(MAINTENANCE)
        self._values[MAINTENANCE] = value
        if value == previous:
            return
        if previous in (TERMINATE, MIGRATE):
            ctx.sink.clear(self.name, _maintenance_id(previous))
        if value not in (TERMINATE, MIGRATE):
            if value != "NONE":
                log.warning("gcp: ignoring unknown maintenance-event %r", value)
            return
        now = utcnow()
        terminate = value == TERMINATE
        notice = Notice(
            self.name,
            "maintenance" if terminate else "migrate",
            deadline=now + MAINTENANCE_NOTICE if terminate else None,
            detected_at=now,
            raw={"maintenance-event": value},
            id=_maintenance_id(value),
        )
        ctx.sink.notice(notice)


def _maintenance_id(value: str) -> str:
    return f"maintenance-{value.lower()}"
