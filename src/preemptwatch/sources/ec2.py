"""EC2: spot interruptions, rebalance recommendations, scheduled maintenance and Auto
Scaling terminations, read from the instance metadata service (IMDSv2).

One monitor per endpoint, each with its own retry and backoff, so a failing or slow
endpoint never delays the others. Polling is the whole idle cost (about 1 ms of CPU per
metadata read at one read a second), so each endpoint is read only as often as its
notice needs:

- ``spot/instance-action`` every ``interval`` (default 1 s): the two-minute warning is
  the one that cannot wait (AWS suggests checking every 5 s).
- ``events/recommendations/rebalance`` and ``autoscaling/target-lifecycle-state`` every
  ``slow_interval`` (default 60 s): a rebalance recommendation is advisory and comes
  minutes before the interruption notice (which the 1 s read catches), and an Auto Scaling
  termination either waits for a lifecycle hook (an hour by default) or shuts the
  instance down at once (a SIGTERM the signal source sees).
- ``events/maintenance/scheduled`` every ``maintenance_interval`` (default 60 s): events
  are scheduled days ahead, so a minute of delay costs nothing.

The monitors share one time grid, so reads that fall due together (every minute)
go out in a single wake-up. On an on-demand instance (``instance-life-cycle``, read once
at start) the two spot-only endpoints are not read at all.

Tokens: one IMDSv2 token (TTL ``token_ttl``, default 3600 s) shared by the monitors,
renewed when 15 s or less are left by the GET responses' remaining-TTL header or by our
own clock, and renewed once more (and the request retried once) on a 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import aiohttp

from ..notice import Notice, body_hash, utcnow
from .base import PollingSource, SourceContext, SourceError, backoff
from .http import http_errors, run_together

log = logging.getLogger("preemptwatch.sources.ec2")

DEFAULT_URL = "http://169.254.169.254"
URL_ENV = "PREEMPTWATCH_EC2_METADATA_URL"
TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
#: Renew the token when this many seconds or fewer are left.
REFRESH_MARGIN = 15.0
HOP_LIMIT_HINT = (
    "if this runs in a container, the instance's metadata hop limit is probably 1: "
    "raise the hop limit to 2 or use host networking"
)

SPOT_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
MAINTENANCE_PATH = "/latest/meta-data/events/maintenance/scheduled"
ASG_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
LIFE_CYCLE_PATH = "/latest/meta-data/instance-life-cycle"
IDENTITY_PATH = "/latest/dynamic/instance-identity/document"

_SPOT_ACTIONS = ("terminate", "stop", "hibernate")
_MONTH_NAMES = (
    *("jan", "feb", "mar", "apr", "may", "jun"),
    *("jul", "aug", "sep", "oct", "nov", "dec"),
)
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, 1)}
_EVENT_DATE = re.compile(r"^(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) (GMT|UTC)$")
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,6})\d*)?([Zz]|[+-]\d{2}:\d{2})$"
)
_LIFECYCLE_STATE = re.compile(r"^[A-Za-z]+(?::[A-Za-z]+)?$")


def metadata_url(url: str | None = None) -> str:
    """The IMDS root: ``url``, else ``PREEMPTWATCH_EC2_METADATA_URL``, else the real one.
    ``ValueError`` for anything but an http(s) URL."""
    root = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip().rstrip("/")
    scheme, _, rest = root.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise ValueError(
            f"EC2 metadata URL must look like http://169.254.169.254, not {root!r} "
            f"(from {'url=' if url else URL_ENV})"
        )
    return root


def parse_rfc3339(value: Any) -> datetime:
    """``2017-09-18T08:22:00Z`` → an aware UTC datetime; ``ValueError`` otherwise."""
    match = _RFC3339.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not an RFC 3339 time with a UTC offset: {value!r}")
    day, clock, fraction, zone = match.groups()
    text = f"{day}T{clock}.{(fraction or '').ljust(6, '0')}"
    try:
        parsed = datetime.fromisoformat(text + ("+00:00" if zone in "Zz" else zone))
    except ValueError:
        raise ValueError(f"not an RFC 3339 time: {value!r}") from None
    return parsed.astimezone(timezone.utc)


def parse_event_date(value: Any) -> datetime:
    """``21 Jan 2019 09:00:43 GMT`` (scheduled events) → an aware UTC datetime."""
    match = _EVENT_DATE.match(value.strip()) if isinstance(value, str) else None
    month = _MONTHS.get(match.group(2).lower()) if match else None
    if match is None or month is None:
        raise ValueError(f"not an EC2 event date like '21 Jan 2019 09:00:43 GMT': {value!r}")
    day, year, hh, mm, ss = (int(match.group(i)) for i in (1, 3, 4, 5, 6))
    return datetime(year, month, day, hh, mm, ss, tzinfo=timezone.utc)


class IMDSClient:
    """IMDSv2 requests: token handling, timeouts, and status codes turned into
    `SourceError` with a message saying what is wrong."""

    def __init__(self, url: str, token_ttl: int = 3600, timeout: float = 2.0) -> None:
        self.url = url
        self.token_ttl = token_ttl
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._token: str | None = None
        self._expires = 0.0  # monotonic
        self._margin = REFRESH_MARGIN
        self._lock: asyncio.Lock | None = None

    async def get(self, session: aiohttp.ClientSession, path: str) -> str | None:
        """The text at ``path``, or None on 404; `SourceError` on anything else."""
        token = await self._current_token(session)
        status, text, headers = await self._request(session, "GET", path, token)
        if status == 401:
            log.info("ec2: token refused (401) on %s; getting a new one", path)
            token = await self._current_token(session, stale=token)
            status, text, headers = await self._request(session, "GET", path, token)
            if status == 401:
                raise SourceError(f"{path}: 401 Unauthorized even with a fresh IMDSv2 token")
        if status == 200:
            self._note_ttl(headers.get(TTL_HEADER))
            return text
        if status == 404:
            return None
        if status == 403:
            raise SourceError(
                f"{path}: 403 Forbidden: the instance metadata service is disabled on this "
                "instance (enable it with modify-instance-metadata-options --http-endpoint "
                "enabled)"
            )
        raise SourceError(f"{path}: unexpected HTTP {status} from {self.url}")

    async def _current_token(self, session: aiohttp.ClientSession, stale: str | None = None) -> str:
        """A token with more than `REFRESH_MARGIN` seconds left (half its life for tokens
        shorter than that), other than ``stale`` (one that was just refused)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            token = self._token
            if token is None or token == stale or time.monotonic() >= self._expires - self._margin:
                self._token = None
                token, ttl = await self._new_token(session)
                self._token, self._expires = token, time.monotonic() + ttl
                self._margin = min(REFRESH_MARGIN, ttl / 2)
            return token

    async def _new_token(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        headers = {TTL_HEADER: str(self.token_ttl)}
        timed_out = (
            f"IMDSv2 token request to {self.url}{TOKEN_PATH} timed out after "
            f"{self.timeout.total:g}s; {HOP_LIMIT_HINT}"
        )
        where = f"cannot reach EC2 instance metadata at {self.url}"
        with http_errors(where, timed_out=timed_out, name=False):
            async with session.put(
                self.url + TOKEN_PATH, headers=headers, timeout=self.timeout
            ) as resp:
                body = await _read_text(resp)
                status, ttl_header = resp.status, resp.headers.get(TTL_HEADER)
        if status == 403:
            raise SourceError(
                "IMDSv2 token request refused (403 Forbidden): the instance metadata service "
                "is disabled on this instance"
            )
        if status != 200:
            raise SourceError(f"IMDSv2 token request to {self.url}{TOKEN_PATH}: HTTP {status}")
        token = body.strip()
        if not token or any(c.isspace() for c in token):
            raise SourceError(f"IMDSv2 token request to {self.url}: malformed token in the answer")
        ttl = _ttl(ttl_header, default=None)
        return token, ttl if ttl is not None and ttl > 0 else float(self.token_ttl)

    def _note_ttl(self, value: str | None) -> None:
        """Believe the remaining-TTL header when it says the token ends sooner."""
        remaining = _ttl(value, default=None)
        if remaining is not None and self._token is not None:
            self._expires = min(self._expires, time.monotonic() + remaining)

    async def _request(
        self, session: aiohttp.ClientSession, method: str, path: str, token: str
    ) -> tuple[int, str, Any]:
        timed_out = f"{path}: no answer from {self.url} within {self.timeout.total:g}s"
        with http_errors(f"{path}: cannot reach {self.url}", timed_out=timed_out, name=False):
            async with session.request(
                method, self.url + path, headers={TOKEN_HEADER: token}, timeout=self.timeout
            ) as resp:
                return resp.status, await _read_text(resp), resp.headers


def _ttl(value: str | None, default: float | None) -> float | None:
    """A TTL header's seconds, or ``default`` when absent or unreadable."""
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


async def _read_text(resp: aiohttp.ClientResponse) -> str:
    return (await resp.read()).decode("utf-8", errors="replace")


def _json(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise SourceError(f"{path}: malformed JSON: {text[:80]!r}") from None


class _Monitor(PollingSource):
    """One endpoint read every ``every`` seconds on a time grid shared with the other
    monitors, so reads that fall due together go out in one wake-up of the loop (one
    wake-up instead of several, on warm caches). Failures are retried by tenacity with
    jittered exponential backoff, as in `PollingSource`."""

    name = "ec2"

    def __init__(
        self, check: Callable[[SourceContext], Awaitable[None]], every: float, origin: float
    ) -> None:
        super().__init__(every)
        self.check = check
        self.origin = origin
        self.max_backoff = max(30.0, every)

    async def poll(self, ctx: SourceContext) -> None:
        await self.check(ctx)

    async def run(self, ctx: SourceContext) -> None:
        loop = asyncio.get_running_loop()
        retrying = backoff(self.interval, self.max_backoff, self._before_retry(ctx))
        while True:
            async for attempt in retrying.copy():
                with attempt:
                    await self.check(ctx)
            ctx.sink.poll_ok(self.name)
            now = loop.time()
            ticks = math.floor((now - self.origin) / self.interval) + 1
            await _sleep_until(loop, self.origin + ticks * self.interval)


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Sleep until the loop's clock reads ``when``; equal ``when``s wake together."""
    waiter = loop.create_future()
    handle = loop.call_at(when, _wake, waiter)
    try:
        await waiter
    finally:
        handle.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EC2Source(PollingSource):
    """Watches EC2 instance metadata; see the module docstring for what and how often.

    Notices: spot ``terminate`` / ``stop`` (deadline the notice's ``time``) and
    ``hibernate`` (starts at once: deadline now); ``rebalance`` (advisory, cleared when
    withdrawn); ``maintenance`` for each active scheduled event (deadline ``NotBefore``,
    ID ``EventId``; cleared when cancelled, completed or gone); ``terminate`` when the
    Auto Scaling target lifecycle state turns ``Terminated``.
    """

    name = "ec2"
    interval = 1.0

    def __init__(
        self,
        url: str | None = None,
        interval: float | None = None,
        slow_interval: float = 60.0,
        maintenance_interval: float = 60.0,
        token_ttl: int = 3600,
        timeout: float = 2.0,
    ) -> None:
        super().__init__(interval)
        if not isinstance(token_ttl, int) or not 1 <= token_ttl <= 21600:
            raise ValueError("token_ttl must be an integer from 1 to 21600 seconds")
        for label, value in (
            ("slow_interval", slow_interval),
            ("maintenance_interval", maintenance_interval),
            ("timeout", timeout),
        ):
            if value <= 0:
                raise ValueError(f"{label} must be positive")
        self.url = metadata_url(url)
        self.slow_interval = slow_interval
        self.maintenance_interval = maintenance_interval
        self.imds = IMDSClient(self.url, token_ttl, timeout)
        self._rebalance_id: str | None = None
        self._maintenance_ids: set[str] = set()

    # ------------------------------------------------------------- running

    def monitors(self, spot: bool = True) -> list[PollingSource]:
        """The per-endpoint polling loops `run` drives (without the spot-only endpoints
        when ``spot`` is false)."""
        origin = asyncio.get_running_loop().time()
        checks: list[tuple[Callable[[SourceContext], Awaitable[None]], float]] = [
            (self.check_asg, self.slow_interval),
            (self.check_maintenance, self.maintenance_interval),
        ]
        if spot:
            checks[:0] = [
                (self.check_spot, self.interval),
                (self.check_rebalance, self.slow_interval),
            ]
        return [_Monitor(check, every, origin) for check, every in checks]

    async def run(self, ctx: SourceContext) -> None:
        """Run every monitor until cancelled. On an on-demand instance, which never gets
        spot interruptions or rebalance recommendations, those endpoints are not read."""
        life_cycle = await self.life_cycle(ctx.session)
        spot = life_cycle not in ("on-demand", "scheduled")
        if not spot:
            log.info("ec2: %s instance: not watching for spot notices", life_cycle)
        await run_together(m.run(ctx) for m in self.monitors(spot))

    async def life_cycle(self, session: aiohttp.ClientSession) -> str | None:
        """``spot``, ``on-demand`` or ``scheduled``; None when it cannot be read."""
        try:
            text = await self.imds.get(session, LIFE_CYCLE_PATH)
        except SourceError as exc:
            log.info("ec2: instance life cycle unknown (%s); watching for spot notices", exc)
            return None
        return text.strip() if text else None

    async def poll(self, ctx: SourceContext) -> None:
        """Read every endpoint once (a one-shot check); raises the first failure."""
        for check in (
            self.check_spot,
            self.check_rebalance,
            self.check_asg,
            self.check_maintenance,
        ):
            await check(ctx)

    # -------------------------------------------------------------- checks

    async def check_spot(self, ctx: SourceContext) -> None:
        """``spot/instance-action`` → terminate / stop / hibernate."""
        text = await self.imds.get(ctx.session, SPOT_PATH)
        if text is None:
            return
        data = _json(SPOT_PATH, text)
        if not isinstance(data, dict):
            raise SourceError(f"{SPOT_PATH}: expected a JSON object, got {text[:80]!r}")
        action = data.get("action")
        if not isinstance(action, str) or action.lower() not in _SPOT_ACTIONS:
            raise SourceError(f"{SPOT_PATH}: unknown action {action!r} in {text[:80]!r}")
        try:
            deadline = parse_rfc3339(data.get("time"))
        except ValueError as exc:
            raise SourceError(f"{SPOT_PATH}: {exc}") from None
        kind = action.lower()
        now = utcnow()
        if kind == "hibernate":
            deadline = now  # hibernation starts as soon as the notice is given
        ctx.sink.notice(
            Notice("ec2", kind, deadline=deadline, detected_at=now, raw=data, id=body_hash(data))
        )

    async def check_rebalance(self, ctx: SourceContext) -> None:
        """``events/recommendations/rebalance`` → rebalance, cleared when it goes away."""
        text = await self.imds.get(ctx.session, REBALANCE_PATH)
        if text is None:
            if self._rebalance_id is not None:
                ctx.sink.clear("ec2", self._rebalance_id)
                self._rebalance_id = None
            return
        data = _json(REBALANCE_PATH, text)
        if not isinstance(data, dict) or "noticeTime" not in data:
            raise SourceError(
                f"{REBALANCE_PATH}: expected {{'noticeTime': ...}}, got {text[:80]!r}"
            )
        try:
            parse_rfc3339(data["noticeTime"])
        except ValueError as exc:
            raise SourceError(f"{REBALANCE_PATH}: {exc}") from None
        notice_id = body_hash(data)
        if self._rebalance_id not in (None, notice_id):
            ctx.sink.clear("ec2", self._rebalance_id)
        self._rebalance_id = notice_id
        ctx.sink.notice(Notice("ec2", "rebalance", raw=data, id=notice_id))

    async def check_maintenance(self, ctx: SourceContext) -> None:
        """``events/maintenance/scheduled`` → one maintenance notice per active event;
        events that are cancelled, completed or gone are cleared."""
        text = await self.imds.get(ctx.session, MAINTENANCE_PATH)
        data = [] if text is None else _json(MAINTENANCE_PATH, text)
        if not isinstance(data, list):
            raise SourceError(f"{MAINTENANCE_PATH}: expected a JSON array, got {text!r:.80}")
        active: dict[str, Notice] = {}
        for event in data:  # validate everything before changing anything
            if not isinstance(event, dict):
                raise SourceError(f"{MAINTENANCE_PATH}: expected event objects, got {event!r:.80}")
            event_id, state = event.get("EventId"), event.get("State")
            if not isinstance(event_id, str) or not event_id or not isinstance(state, str):
                raise SourceError(f"{MAINTENANCE_PATH}: event without EventId or State: {event}")
            if state.lower() != "active":
                continue
            try:
                deadline = parse_event_date(event.get("NotBefore"))
            except ValueError as exc:
                raise SourceError(f"{MAINTENANCE_PATH}: event {event_id}: {exc}") from None
            active[event_id] = Notice(
                "ec2", "maintenance", deadline=deadline, raw=event, id=event_id
            )
        for gone in sorted(self._maintenance_ids - active.keys()):
            ctx.sink.clear("ec2", gone)
        self._maintenance_ids = set(active)
        for notice in active.values():
            ctx.sink.notice(notice)

    async def check_asg(self, ctx: SourceContext) -> None:
        """``autoscaling/target-lifecycle-state`` ``Terminated`` → terminate."""
        text = await self.imds.get(ctx.session, ASG_PATH)
        if text is None:
            return
        state = text.strip()
        if not _LIFECYCLE_STATE.match(state):
            raise SourceError(f"{ASG_PATH}: not a lifecycle state: {text[:80]!r}")
        if state.endswith("Terminated"):
            raw = {"target-lifecycle-state": state}
            ctx.sink.notice(Notice("ec2", "terminate", raw=raw, id=body_hash(raw)))

    # ------------------------------------------------------ class helpers

    @classmethod
    async def detect(cls, session: aiohttp.ClientSession, timeout: float = 0.5) -> bool:
        """True when an EC2 metadata service answers: a token PUT succeeds, or (the PUT
        being dropped by a hop limit of 1) a token-less GET gets EC2's answer."""
        try:
            url = metadata_url()
        except ValueError as exc:
            log.warning("ec2: %s", exc)
            return False
        client_timeout = aiohttp.ClientTimeout(total=timeout)

        async def put() -> bool:
            headers = {TTL_HEADER: "60"}
            async with session.put(url + TOKEN_PATH, headers=headers, timeout=client_timeout) as r:
                return r.status == 200 and bool((await _read_text(r)).strip())

        async def get() -> bool:
            async with session.get(url + "/latest/meta-data/", timeout=client_timeout) as r:
                if r.status == 401:
                    return True
                text = await _read_text(r) if r.status == 200 else ""
                return "instance-id" in text.split()

        results = await asyncio.gather(put(), get(), return_exceptions=True)
        if results[0] is True:
            return True
        if results[1] is True:
            log.warning("ec2: metadata service found but no IMDSv2 token; %s", HOP_LIMIT_HINT)
            return True
        return False

    @classmethod
    async def fetch_instance_id(cls, session: aiohttp.ClientSession) -> str | None:
        """This instance's ID from the identity document, or None (never raises)."""
        try:
            text = await IMDSClient(metadata_url(), 60, timeout=1.0).get(session, IDENTITY_PATH)
            data = json.loads(text) if text is not None else None
        except (SourceError, ValueError) as exc:
            log.debug("ec2: no instance ID: %s", exc)
            return None
        instance_id = data.get("instanceId") if isinstance(data, dict) else None
        return instance_id if isinstance(instance_id, str) and instance_id else None
