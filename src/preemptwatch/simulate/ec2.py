"""EC2 instance metadata (IMDSv2) with spot, rebalance, maintenance and Auto Scaling notices.

Serves what the real service at ``http://169.254.169.254`` serves, as PROTOCOLS.md
describes it: session tokens from ``PUT /latest/api/token`` with a TTL (1..21600 s, 400
otherwise; a PUT carrying ``X-Forwarded-For`` or to a versioned path gets 403), 401 for a
missing, unknown or expired token, the token's remaining TTL on every GET, 404 when
nothing is scheduled, and every value as ``text/plain`` (JSON documents included), the
way EC2 serves them.

Tests shorten token lifetimes with ``max_token_ttl`` and revoke tokens with
:meth:`EC2Simulator.revoke_tokens` to exercise expiry mid-run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from .base import Fault, SimulatorBase, reset

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TTL = 21600

#: Spot interruption actions, served at ``spot/instance-action``.
SPOT_KINDS = ("terminate", "stop", "hibernate")
#: Every kind :meth:`EC2Simulator.schedule` accepts.
KINDS = (*SPOT_KINDS, "rebalance", "maintenance", "asg-terminated")
FAULT_MODES = ("timeout", "garbage", "reset")
MAINTENANCE_CODES = (
    "instance-stop",
    "instance-retirement",
    "instance-reboot",
    "system-reboot",
    "system-maintenance",
)

_SPOT_DETAILS = frozenset({"time", "lead"})
_DETAILS: dict[str, frozenset[str]] = {
    **{kind: _SPOT_DETAILS for kind in SPOT_KINDS},
    "rebalance": frozenset({"noticeTime"}),
    "maintenance": frozenset(
        {"code", "event_id", "description", "not_before", "not_after", "lead", "duration", "state"}
    ),
    "asg-terminated": frozenset(),
}

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_ERROR_PAGE = """<?xml version="1.0" encoding="iso-8859-1"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">
 <head>
  <title>{status} - {reason}</title>
 </head>
 <body>
  <h1>{status} - {reason}</h1>
 </body>
</html>
"""


def rfc3339(when: datetime) -> str:
    """``2017-09-18T08:22:00Z``, as spot notices write times."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_date(when: datetime) -> str:
    """``21 Jan 2019 09:00:43 GMT``, as scheduled maintenance events write dates."""
    when = when.astimezone(timezone.utc)
    return f"{when.day} {_MONTHS[when.month - 1]} {when.year} {when:%H:%M:%S} GMT"


@dataclass
class _Scheduled:
    """One notice: hidden until ``visible_at`` (monotonic), then served."""

    kind: str
    visible_at: float
    details: dict[str, Any]
    #: For maintenance events: active, completed or canceled.
    state: str = "active"

    def visible(self, now: float) -> bool:
        return now >= self.visible_at


@dataclass
class EC2Simulator(SimulatorBase):
    """A local EC2 instance metadata service; serve :meth:`app` (see `SimulatorThread`).

    ``imdsv1`` also answers GETs without a token (IMDSv2 "optional"); by default tokens
    are required, as on instances launched with ``HttpTokens=required``.
    ``max_token_ttl`` caps token lifetimes (seconds) so tests can see them expire.
    ``lead`` is how far ahead of its appearance a spot notice's ``time`` lies (EC2: 120 s).
    """

    instance_id: str = "i-0123456789abcdef0"
    region: str = "us-east-1"
    availability_zone: str = "us-east-1a"
    instance_type: str = "g5.xlarge"
    account_id: str = "123456789012"
    life_cycle: str = "spot"
    imdsv1: bool = False
    in_asg: bool = False
    max_token_ttl: float | None = None
    lead: float = 120.0
    #: How long a ``timeout`` fault hangs (longer than any client timeout).
    hang_seconds: float = 30.0
    #: Metadata requests served (control requests not counted).
    requests: int = 0
    #: Metadata requests served, per method and path (``"GET /latest/..."``).
    requests_by_path: Counter[str] = field(default_factory=Counter)
    #: Metadata responses, per HTTP status (0: connection dropped).
    statuses: Counter[int] = field(default_factory=Counter)
    #: Tokens issued so far.
    tokens_issued: int = 0
    _tokens: dict[str, float] = field(default_factory=dict, repr=False)
    _notices: list[_Scheduled] = field(default_factory=list, repr=False)
    _faults: list[Fault] = field(default_factory=list, repr=False)
    _closing: asyncio.Event | None = field(default=None, repr=False)

    # ------------------------------------------------------------- control API

    def schedule(self, kind: str, after: float = 0.0, **details: Any) -> dict[str, Any]:
        """Make a notice of ``kind`` appear ``after`` seconds from now.

        Details: spot kinds take ``time`` (RFC 3339) or ``lead`` (seconds after
        appearance, default the simulator's); ``rebalance`` takes ``noticeTime``;
        ``maintenance`` takes ``code``, ``event_id``, ``description``, ``not_before`` /
        ``not_after`` (dates as EC2 writes them) or ``lead`` / ``duration`` (seconds) and
        ``state``. Times given as details are served as they are (to rehearse malformed
        ones). A spot action replaces an earlier one; maintenance events add up.
        Raises ``ValueError`` on a bad kind or detail, changing nothing.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown EC2 notice kind {kind!r}; expected one of {list(KINDS)}")
        after = _seconds(after, "after")
        unknown = set(details) - _DETAILS[kind]
        if unknown:
            raise ValueError(
                f"unknown detail(s) {sorted(unknown)} for {kind!r}; "
                f"expected some of {sorted(_DETAILS[kind])}"
            )
        now = time.monotonic()
        appears = datetime.now(timezone.utc) + timedelta(seconds=after)
        details = dict(details)
        state = "active"
        if kind in SPOT_KINDS:
            lead = _seconds(details.pop("lead", self.lead), "lead")
            details.setdefault("time", rfc3339(appears + timedelta(seconds=lead)))
        elif kind == "rebalance":
            details.setdefault("noticeTime", rfc3339(appears))
        elif kind == "maintenance":
            lead = _seconds(details.pop("lead", 600.0), "lead")
            duration = _seconds(details.pop("duration", 7200.0), "duration")
            start = appears + timedelta(seconds=lead)
            details.setdefault("code", "system-reboot")
            if details["code"] not in MAINTENANCE_CODES:
                raise ValueError(f"maintenance 'code' must be one of {list(MAINTENANCE_CODES)}")
            details.setdefault("event_id", f"instance-event-{secrets.token_hex(9)[:17]}")
            details.setdefault("description", "scheduled reboot")
            details.setdefault("not_before", event_date(start))
            details.setdefault("not_after", event_date(start + timedelta(seconds=duration)))
            state = str(details.pop("state", "active"))
            if state not in ("active", "completed", "canceled"):
                raise ValueError("maintenance 'state' must be active, completed or canceled")
        item = _Scheduled(kind, now + after, details, state)
        if kind in SPOT_KINDS:
            self._notices = [n for n in self._notices if n.kind not in SPOT_KINDS]
        elif kind in ("rebalance", "asg-terminated"):
            self._notices = [n for n in self._notices if n.kind != kind]
        self._notices.append(item)
        return self._describe(item, now)

    def clear(self, kind: str | None = None, state: str = "canceled") -> int:
        """Withdraw notices of ``kind`` (all when None); returns how many.

        Maintenance events are marked ``state`` (canceled or completed), as EC2 keeps
        listing them for a while; ``state="removed"`` drops them from the list instead.
        """
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown EC2 notice kind {kind!r}; expected one of {list(KINDS)}")
        if state not in ("canceled", "completed", "removed"):
            raise ValueError("'state' must be canceled, completed or removed")
        cleared = 0
        kept: list[_Scheduled] = []
        for item in self._notices:
            if kind is not None and item.kind != kind:
                kept.append(item)
            elif item.kind == "maintenance" and state != "removed":
                if item.state == "active":
                    cleared += 1
                    item.state = state
                    prefix = "Canceled" if state == "canceled" else "Completed"
                    item.details["description"] = f"{prefix} {item.details['description']}"
                kept.append(item)
            elif item.kind != "maintenance" or item.state == "active":
                cleared += 1
        self._notices = kept
        return cleared

    def fault(
        self,
        status: int | None = None,
        count: int = 1,
        mode: str | None = None,
        method: str | None = None,
    ) -> None:
        """Make the next ``count`` metadata requests fail: answer ``status``, or hang
        (``mode="timeout"``), send a malformed 200 body (``"garbage"``) or drop the
        connection (``"reset"``). ``method`` limits it to ``"GET"`` or ``"PUT"``; 401 and
        garbage faults hit only GETs unless told otherwise (EC2 never answers a token
        PUT with 401)."""
        if (status is None) == (mode is None):
            raise ValueError("give exactly one of 'status' and 'mode'")
        if status is not None and not (isinstance(status, int) and 100 <= status <= 599):
            raise ValueError(f"'status' must be an HTTP status code, not {status!r}")
        if mode is not None and mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; expected one of {list(FAULT_MODES)}")
        if not isinstance(count, int) or count < 1:
            raise ValueError("'count' must be a positive integer")
        if method is not None:
            method = method.upper()
            if method not in ("GET", "PUT"):
                raise ValueError("'method' must be GET or PUT")
        elif status == 401 or mode == "garbage":
            method = "GET"
        self._faults.append(Fault(status, mode, count, method))

    def revoke_tokens(self) -> None:
        """Invalidate every issued token (as a stop/start of the instance does)."""
        self._tokens.clear()

    def state(self) -> dict[str, Any]:
        """What is scheduled, pending faults and request counters (JSON-able)."""
        now = time.monotonic()
        return {
            "notices": [self._describe(n, now) for n in self._notices],
            "faults": [vars(f).copy() for f in self._faults],
            "requests": self.requests,
            "requests_by_path": dict(self.requests_by_path),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "tokens_issued": self.tokens_issued,
            "tokens_live": sum(1 for exp in self._tokens.values() if exp > now),
        }

    # ---------------------------------------------------------------- serving

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.requests_by_path[f"{request.method} {request.path}"] += 1
        response = await self._answer(request)
        transport = request.transport
        reset = transport is None or transport.is_closing()
        self.statuses[0 if reset else response.status] += 1
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        fault = self._take_fault(request.method)
        if fault is not None:
            if fault.mode == "timeout":
                await self._hang(self.hang_seconds)
            elif fault.mode == "reset":
                return reset(request)
            elif fault.status is not None:
                return _error(fault.status)
        if request.method == "PUT":
            return self._put_token(request)
        if request.method != "GET" or request.path.endswith("/api/token"):
            return _error(405)
        remaining: float | None = None
        if TOKEN_HEADER in request.headers:
            remaining = self._token_remaining(request.headers[TOKEN_HEADER])
            if remaining is None:
                return _error(401)
        elif not self.imdsv1:
            return _error(401)
        value = self._lookup(request.path)
        if fault is not None and fault.mode == "garbage":
            # Half of the real value (or of a made-up one), then bytes no parser accepts.
            value = value or '{"action": "terminate", "time": "2030-01-01T00:00:00Z"}'
            response: web.Response = _text(value[: max(1, len(value) // 2)] + "\x00\ufffd{")
        elif value is None:
            response = _error(404)
        else:
            response = _text(value)
        if remaining is not None:
            response.headers[TTL_HEADER] = str(int(remaining))
        return response

    def _put_token(self, request: web.Request) -> web.Response:
        if "X-Forwarded-For" in request.headers:
            return _error(403)
        if request.path != "/latest/api/token":
            # Token requests to a versioned path are refused; anything else is unknown.
            return _error(403 if request.path.endswith("/api/token") else 405)
        raw = request.headers.get(TTL_HEADER, "")
        try:
            ttl = int(raw)
        except ValueError:
            return _error(400)
        if not 1 <= ttl <= MAX_TTL:
            return _error(400)
        lifetime = float(ttl)
        if self.max_token_ttl is not None:
            lifetime = min(lifetime, self.max_token_ttl)
        now = time.monotonic()
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        token = secrets.token_urlsafe(42)
        self._tokens[token] = now + lifetime
        self.tokens_issued += 1
        response = _text(token)
        response.headers[TTL_HEADER] = str(max(1, int(lifetime)))
        return response

    def _token_remaining(self, token: str) -> float | None:
        expires = self._tokens.get(token)
        if expires is None:
            return None
        remaining = expires - time.monotonic()
        if remaining <= 0:
            del self._tokens[token]
            return None
        return remaining

    # ------------------------------------------------------------ the tree

    def _lookup(self, path: str) -> str | None:
        """The value at ``path``: a text value, a directory listing, or None (404)."""
        if path == "/":
            return "latest"
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "latest":
            return None
        node: Any = self._tree()
        for part in parts[1:]:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if isinstance(node, dict):
            return "\n".join(k + "/" if isinstance(v, dict) else k for k, v in node.items())
        return str(node)

    def _tree(self) -> dict[str, Any]:
        now = time.monotonic()
        visible = [n for n in self._notices if n.visible(now)]
        meta: dict[str, Any] = {
            "ami-id": "ami-0abcdef1234567890",
            "hostname": "ip-10-0-0-12.ec2.internal",
            "instance-id": self.instance_id,
            "instance-life-cycle": self.life_cycle,
            "instance-type": self.instance_type,
            "local-ipv4": "10.0.0.12",
            "placement": {
                "availability-zone": self.availability_zone,
                "region": self.region,
            },
        }
        events: dict[str, Any] = {
            "maintenance": {
                "history": json.dumps(
                    [_event(n) for n in visible if n.kind == "maintenance" and n.state != "active"]
                ),
                "scheduled": json.dumps([_event(n) for n in visible if n.kind == "maintenance"]),
            }
        }
        for n in visible:
            if n.kind == "rebalance":
                events["recommendations"] = {"rebalance": json.dumps(n.details)}
        meta["events"] = events
        in_asg = self.in_asg or any(n.kind == "asg-terminated" for n in self._notices)
        if in_asg:
            terminated = any(n.kind == "asg-terminated" for n in visible)
            meta["autoscaling"] = {
                "target-lifecycle-state": "Terminated" if terminated else "InService"
            }
        for n in visible:
            if n.kind in SPOT_KINDS:
                spot: dict[str, Any] = {
                    "instance-action": json.dumps({"action": n.kind, "time": n.details["time"]})
                }
                if n.kind != "hibernate":
                    spot["termination-time"] = n.details["time"]
                meta["spot"] = spot
        document = {
            "accountId": self.account_id,
            "architecture": "x86_64",
            "availabilityZone": self.availability_zone,
            "imageId": meta["ami-id"],
            "instanceId": self.instance_id,
            "instanceType": self.instance_type,
            "pendingTime": "2026-01-01T00:00:00Z",
            "privateIp": meta["local-ipv4"],
            "region": self.region,
            "version": "2017-09-30",
        }
        return {
            "meta-data": meta,
            "dynamic": {"instance-identity": {"document": json.dumps(document, indent=2)}},
        }

    def _describe(self, item: _Scheduled, now: float) -> dict[str, Any]:
        return {
            "kind": item.kind,
            "visible": item.visible(now),
            "in": max(0.0, item.visible_at - now),
            "state": item.state,
            **item.details,
        }

    # ------------------------------------------------------- control over HTTP

    async def _control_schedule(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if "kind" not in body:
            raise _bad("'kind' is required")
        try:
            item = self.schedule(**body)
        except (TypeError, ValueError) as exc:
            raise _bad(str(exc)) from None
        return web.json_response({"scheduled": item})

    async def _control_clear(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            cleared = self.clear(**body)
        except (TypeError, ValueError) as exc:
            raise _bad(str(exc)) from None
        return web.json_response({"cleared": cleared})

    async def _control_fault(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            self.fault(**body)
        except (TypeError, ValueError) as exc:
            raise _bad(str(exc)) from None
        return web.json_response({"faults": [vars(f).copy() for f in self._faults]})


def _event(item: _Scheduled) -> dict[str, str]:
    d = item.details
    return {
        "NotBefore": str(d["not_before"]),
        "Code": str(d["code"]),
        "Description": str(d["description"]),
        "EventId": str(d["event_id"]),
        "NotAfter": str(d["not_after"]),
        "State": item.state,
    }


def _seconds(value: Any, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name!r} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name!r} must be a finite, non-negative number of seconds")
    return seconds


def _text(value: str) -> web.Response:
    response = web.Response(text=value, content_type="text/plain")
    response.headers["Server"] = "EC2ws"
    return response


def _error(status: int) -> web.Response:
    reason = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
    }.get(status, "Error")
    response = web.Response(
        status=status,
        text=_ERROR_PAGE.format(status=status, reason=reason),
        content_type="text/html",
    )
    response.headers["Server"] = "EC2ws"
    return response


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": "bad_request", "message": message}),
        content_type="application/json",
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise _bad("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``preemptwatch simulate ec2``."""
    parser.add_argument(
        "--notice-after",
        type=float,
        metavar="SECONDS",
        help="schedule a notice this many seconds after start (default: none)",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="terminate",
        help="kind of that notice (default: %(default)s)",
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="spot notices' 'time' lies this far after they appear (default: %(default)s)",
    )
    parser.add_argument(
        "--instance-id", default="i-0123456789abcdef0", help="instance ID (default: %(default)s)"
    )
    parser.add_argument(
        "--on-demand", action="store_true", help="instance-life-cycle on-demand instead of spot"
    )
    parser.add_argument(
        "--asg", action="store_true", help="the instance is in an Auto Scaling group"
    )
    parser.add_argument(
        "--imdsv1", action="store_true", help="also answer GETs without a token (IMDSv1)"
    )
    parser.add_argument(
        "--max-token-ttl",
        type=float,
        metavar="SECONDS",
        help="cap token lifetimes, to rehearse expiry (default: as requested)",
    )


def from_args(args: argparse.Namespace) -> EC2Simulator:
    """The simulator the flags describe, with the ``--notice-after`` notice scheduled."""
    if args.lead < 0:
        raise SystemExit("--lead must not be negative")
    if args.max_token_ttl is not None and args.max_token_ttl <= 0:
        raise SystemExit("--max-token-ttl must be positive")
    sim = EC2Simulator(
        instance_id=args.instance_id,
        life_cycle="on-demand" if args.on_demand else "spot",
        imdsv1=args.imdsv1,
        in_asg=args.asg,
        max_token_ttl=args.max_token_ttl,
        lead=args.lead,
    )
    if args.notice_after is not None:
        if args.notice_after < 0:
            raise SystemExit("--notice-after must not be negative")
        sim.schedule(args.kind, after=args.notice_after)
    return sim
