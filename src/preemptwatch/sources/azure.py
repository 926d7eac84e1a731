"""The Azure source: Spot eviction and platform maintenance from Scheduled Events.

It polls ``/metadata/scheduledevents?api-version=2020-07-01`` (header ``Metadata: true``)
once a second, as Azure recommends. The first call may take minutes while the service
turns on, so only that call gets a generous timeout. ``Preempt`` becomes a ``preempt``
notice; ``Freeze``, ``Reboot``, ``Redeploy`` and ``Terminate`` become ``maintenance``.
The deadline is the event's ``NotBefore`` (RFC 1123; an empty one is unknown, and for
``Preempt`` means now + 30 s). Events reach every VM of a scale set: only those whose
``Resources`` name this VM count (its name is read once from IMDS and cached). An event
that leaves the document is cleared. A document whose ``DocumentIncarnation`` has not
changed is not parsed again. With ``ack=True`` each event is acknowledged (``StartRequests``)
once its notice has been delivered, which lets the platform go ahead at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from ..notice import Notice, utcnow
from .base import PollingSource, SourceContext, SourceError, backoff
from .http import http_errors, quietly, read_body

log = logging.getLogger("preemptwatch.sources.azure")

URL_ENV = "PREEMPTWATCH_AZURE_METADATA_URL"
DEFAULT_URL = "http://169.254.169.254"
EVENTS_PATH = "/metadata/scheduledevents"
EVENTS_API = "2020-07-01"
INSTANCE_API = "2021-02-01"
HEADERS = {"Metadata": "true"}
MAINTENANCE_TYPES = frozenset({"Freeze", "Reboot", "Redeploy", "Terminate"})
#: Azure gives a Spot eviction at least this much notice.
PREEMPT_NOTICE = timedelta(seconds=30)
DETECT_TIMEOUT = 1.0
MAX_BODY = 1024 * 1024


def metadata_url(url: str | None = None) -> str:
    """IMDS's root: ``url``, else ``PREEMPTWATCH_AZURE_METADATA_URL``, else the real one."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def parse_not_before(value: Any) -> datetime | None:
    """``NotBefore`` (RFC 1123, e.g. ``Mon, 19 Sep 2016 18:29:47 GMT``) as UTC; None when
    empty or unreadable."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        log.warning("azure: unreadable NotBefore %r", value)
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


class AzureSource(PollingSource):
    """Polls Azure Scheduled Events for this VM.

    ``vm_name`` skips the IMDS lookup of this VM's name; ``first_timeout`` bounds the first
    call only, ``request_timeout`` every other; ``ack`` acknowledges delivered events.
    """

    name = "azure"
    interval = 1.0

    def __init__(
        self,
        url: str | None = None,
        *,
        interval: float | None = None,
        ack: bool = False,
        vm_name: str | None = None,
        first_timeout: float = 120.0,
        request_timeout: float = 2.0,
        max_backoff: float | None = None,
    ) -> None:
        super().__init__(interval)
        if first_timeout <= 0 or request_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if max_backoff is not None:
            if max_backoff <= 0:
                raise ValueError("max_backoff must be positive")
            self.max_backoff = max_backoff
        self.url = metadata_url(url)
        self.ack = ack
        self.first_timeout = first_timeout
        self.request_timeout = request_timeout
        #: This VM's name (from IMDS unless given), once known.
        self.vm_name = vm_name
        self._incarnation: int | None = None
        self._answered = False  # the first call has been answered
        self._active: dict[str, Notice] = {}
        self._acked: set[str] = set()
        self._acks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ probes

    @classmethod
    async def detect(cls, session: aiohttp.ClientSession, url: str | None = None) -> bool:
        """True when Azure IMDS answers here (quick; never raises)."""
        probe = _compute(session, metadata_url(url), "name", DETECT_TIMEOUT)
        return await quietly(probe) is not None

    @classmethod
    async def fetch_instance_id(
        cls, session: aiohttp.ClientSession, url: str | None = None
    ) -> str | None:
        """``compute/vmId`` (else ``compute/name``), or None when IMDS does not answer."""
        root = metadata_url(url)
        for key in ("vmId", "name"):
            value = await quietly(_compute(session, root, key, DETECT_TIMEOUT))
            if value:
                return value
        return None

    # ----------------------------------------------------------------- polling

    async def run(self, ctx: SourceContext) -> None:
        """Poll until cancelled; pending acknowledgements are cancelled with it."""
        try:
            await super().run(ctx)
        finally:
            for task in self._acks:
                task.cancel()
            await asyncio.gather(*self._acks, return_exceptions=True)

    async def poll(self, ctx: SourceContext) -> None:
        """One look at Scheduled Events: notices for new events, clears for gone ones."""
        if self.vm_name is None:
            try:
                name = await _compute(ctx.session, self.url, "name", self.request_timeout)
            except SourceError as exc:
                raise SourceError(f"cannot read this VM's name: {exc}") from exc
            if not name:
                raise SourceError("cannot read this VM's name: IMDS answered nothing")
            self.vm_name = name
            log.debug("azure: this VM is %s", name)
        document = await self._fetch(ctx.session)
        incarnation = document["DocumentIncarnation"]
        if incarnation == self._incarnation:
            return
        current = self._parse(document["Events"], self.vm_name)
        for event_id in [i for i in self._active if i not in current]:
            del self._active[event_id]
            ctx.sink.clear(self.name, event_id)
        for event_id, notice in current.items():
            if event_id in self._active:
                continue
            self._active[event_id] = notice
            ctx.sink.notice(notice)
            if (
                self.ack
                and event_id not in self._acked
                and notice.raw.get("EventStatus") != "Started"
            ):
                self._acked.add(event_id)
                task = asyncio.ensure_future(self._acknowledge_retrying(ctx.session, event_id))
                self._acks.add(task)
                task.add_done_callback(self._acks.discard)
        self._incarnation = incarnation

    async def _fetch(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """The Scheduled Events document, checked for shape; ``SourceError`` otherwise."""
        url = self.url + EVENTS_PATH
        timeout = self.request_timeout if self._answered else self.first_timeout
        with http_errors(url, timeout):
            async with session.get(
                url,
                params={"api-version": EVENTS_API},
                headers=HEADERS,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as resp:
                body = await read_body(resp, MAX_BODY)
                if resp.status != 200:
                    snippet = body[:200].decode("utf-8", "replace").strip()
                    raise SourceError(f"{url}: HTTP {resp.status}: {snippet}")
        self._answered = True
        try:
            document = json.loads(body)
        except ValueError:
            raise SourceError(f"{url}: malformed document {body[:60]!r}") from None
        if (
            not isinstance(document, dict)
            or not isinstance(document.get("DocumentIncarnation"), int)
            or not isinstance(document.get("Events"), list)
        ):
            raise SourceError(f"{url}: not a Scheduled Events document: {body[:60]!r}")
        return document

    def _parse(self, events: list[Any], vm_name: str) -> dict[str, Notice]:
        """Notices for the events that name this VM, by EventId."""
        mine = vm_name.casefold()
        notices: dict[str, Notice] = {}
        now = utcnow()
        for event in events:
            if not isinstance(event, dict):
                log.warning("azure: ignoring malformed event %r", event)
                continue
            event_id, event_type = event.get("EventId"), event.get("EventType")
            resources = event.get("Resources")
            if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str):
                log.warning("azure: ignoring event without EventId or EventType: %r", event)
                continue
            if not isinstance(resources, list) or mine not in {
                r.casefold() for r in resources if isinstance(r, str)
            }:
                log.debug("azure: event %s is for %s, not this VM", event_id, resources)
                continue
            if event_type == "Preempt":
                kind = "preempt"
            else:
                kind = "maintenance"
                if event_type not in MAINTENANCE_TYPES:
                    log.warning("azure: unknown EventType %r, taken as maintenance", event_type)
            deadline = parse_not_before(event.get("NotBefore"))
            if deadline is None and kind == "preempt":
                deadline = now + PREEMPT_NOTICE
            notices[event_id] = Notice(
                self.name, kind, deadline=deadline, detected_at=now, raw=event, id=event_id
            )
        return notices

    # ------------------------------------------------------------- acknowledge

    async def acknowledge(self, session: aiohttp.ClientSession, event_id: str) -> None:
        """Tell Azure to go ahead with ``event_id`` now; ``SourceError`` on failure."""
        url = self.url + EVENTS_PATH
        with http_errors(f"acknowledge {event_id}", name=False):
            async with session.post(
                url,
                params={"api-version": EVENTS_API},
                headers=HEADERS,
                json={"StartRequests": [{"EventId": event_id}]},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    body = (await read_body(resp, MAX_BODY))[:200].decode("utf-8", "replace")
                    raise SourceError(f"acknowledge {event_id}: HTTP {resp.status}: {body.strip()}")
        log.info("azure: acknowledged event %s", event_id)

    async def _acknowledge_retrying(self, session: aiohttp.ClientSession, event_id: str) -> None:
        try:
            retrying = backoff(self.interval, self.max_backoff, attempts=5, errors=SourceError)
            async for attempt in retrying:
                with attempt:
                    await self.acknowledge(session, event_id)
        except SourceError as exc:
            log.warning("azure: could not acknowledge event %s: %s", event_id, exc)


async def _compute(
    session: aiohttp.ClientSession, root: str, key: str, timeout: float
) -> str | None:
    """``/metadata/instance/compute/<key>`` as text; None on 404; ``SourceError`` otherwise."""
    url = f"{root}/metadata/instance/compute/{key}"
    with http_errors(url, timeout):
        async with session.get(
            url,
            params={"api-version": INSTANCE_API, "format": "text"},
            headers=HEADERS,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            body = await read_body(resp, 4096)
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise SourceError(f"{url}: HTTP {resp.status}")
    return body.decode("utf-8", "replace").strip() or None
