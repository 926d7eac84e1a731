"""GCP metadata server: preempted, maintenance-event and hanging GETs with ETags.

Serves ``/computeMetadata/v1/instance/...`` as Compute Engine does: every request must
carry ``Metadata-Flavor: Google`` (403 without it) and every answer carries it back; a
request with ``X-Forwarded-For`` is refused; each value has an ``ETag``, and
``?wait_for_change=true&last_etag=E&timeout_sec=N`` hangs until the value's ETag differs
from ``E`` or ``N`` seconds pass. Notices, clears and faults are driven from Python
(``schedule``, ``clear``, ``fault``, ``set``) or over HTTP under ``/_control/``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import time
from typing import Any

from aiohttp import web

from .base import Fault, Handler, TimedSimulator, control_action, seconds

log = logging.getLogger("preemptwatch.simulate.gcp")

PREFIX = "/computeMetadata/v1/"
FLAVOR = "Google"
SERVER = "Metadata Server for VM"
PREEMPTED = "instance/preempted"
MAINTENANCE = "instance/maintenance-event"
MAINTENANCE_EVENTS = ("TERMINATE_ON_HOST_MAINTENANCE", "MIGRATE_ON_HOST_MAINTENANCE")
KINDS = ("preempt", "maintenance")
FAULT_MODES = ("timeout", "garbage", "reset", "no-header")


def etag(value: str) -> str:
    """The ETag of a value (16 hex digits, like Compute Engine's)."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class GCPSimulator(TimedSimulator):
    """An in-memory Compute Engine metadata server (see the module docstring).

    Notices (`schedule`): ``preempt`` turns ``instance/preempted`` TRUE; ``maintenance``
    sets ``instance/maintenance-event`` to the detail ``event`` (default
    ``TERMINATE_ON_HOST_MAINTENANCE``; ``MIGRATE_ON_HOST_MAINTENANCE`` for a live
    migration). Faults (`fault`): a status, or ``timeout``, ``garbage``, ``reset``, or
    ``no-header`` (200 without ``Metadata-Flavor``, as a server that is not the metadata
    server would).
    """

    PROVIDER = "GCP"
    KINDS = KINDS
    FAULT_MODES = FAULT_MODES

    def __init__(
        self,
        *,
        provisioning_model: str = "SPOT",
        preemptible: bool | None = None,
        instance_id: str = "4520031799277581759",
        name: str = "preemptwatch-sim",
        zone: str = "projects/123456789012/zones/us-central1-a",
    ) -> None:
        if provisioning_model not in ("SPOT", "STANDARD"):
            raise ValueError(
                f"provisioning model must be SPOT or STANDARD, not {provisioning_model!r}"
            )
        super().__init__()
        if preemptible is None:
            preemptible = provisioning_model == "SPOT"
        self.values: dict[str, str] = {
            "instance/id": instance_id,
            "instance/name": name,
            "instance/zone": zone,
            "instance/hostname": f"{name}.c.sim.internal",
            PREEMPTED: "FALSE",
            MAINTENANCE: "NONE",
            "instance/scheduling/provisioning-model": provisioning_model,
            "instance/scheduling/preemptible": "TRUE" if preemptible else "FALSE",
            "instance/scheduling/on-host-maintenance": "TERMINATE" if preemptible else "MIGRATE",
            "instance/scheduling/automatic-restart": "FALSE" if preemptible else "TRUE",
        }
        # ``served`` counts metadata requests by path below ``/computeMetadata/v1/``.
        # Futures of hanging GETs by path, resolved directly on a change or at shutdown:
        # one loop step from change to answer.
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    # ------------------------------------------------------------- control (Python)

    def set(self, path: str, value: str) -> None:
        """Set a metadata value (``instance/...``); hanging GETs on it return at once."""
        path = path.strip("/")
        if path not in self.values:
            raise ValueError(f"unknown metadata path {path!r}")
        if not isinstance(value, str):
            raise ValueError(f"a metadata value is text, not {value!r}")
        if self.values[path] != value:
            self.values[path] = value
            self._wake(path)

    def state(self) -> dict[str, Any]:
        """What is set and scheduled, and the request counters (``GET /_control/state``)."""
        return {
            "preempted": self.values[PREEMPTED],
            "maintenance_event": self.values[MAINTENANCE],
            "provisioning_model": self.values["instance/scheduling/provisioning-model"],
            "scheduled": self._scheduled(),
            "faults": [f.to_dict() for f in self._faults],
            "requests": self.requests,
            "served": dict(self.served),
        }

    # ----------------------------------------------------------------- the server

    def _check(self, kind: str, details: dict[str, Any]) -> None:
        self._target(kind, details)

    def _appear(self, kind: str, details: dict[str, Any]) -> None:
        self.set(*self._target(kind, details))

    def _withdraw(self, kind: str | None) -> None:
        if kind in (None, "preempt"):
            self.set(PREEMPTED, "FALSE")
        if kind in (None, "maintenance"):
            self.set(MAINTENANCE, "NONE")

    def _controls(self) -> dict[str, Handler]:
        return {"/_control/set": self._control_set}

    def _stopped(self) -> None:
        for path in list(self._waiters):  # release hanging GETs
            self._wake(path)
        super()._stopped()

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self._count(path[len(PREFIX) :] if path.startswith(PREFIX) else path)
        if request.method != "GET":
            return self._text("Method not allowed\n", 405)
        if "X-Forwarded-For" in request.headers:
            return self._text("Request with X-Forwarded-For header refused\n", 403)
        if request.headers.get("Metadata-Flavor") != FLAVOR:
            return self._text('Missing required header "Metadata-Flavor": "Google"\n', 403)
        injected = await self._apply_fault(request)
        if injected is not None:
            return injected
        if path in ("/", "/computeMetadata/", "/computeMetadata/v1", PREFIX):
            return self._text("computeMetadata/\n" if path == "/" else "instance/\n")
        key = path[len(PREFIX) :].strip("/") if path.startswith(PREFIX) else ""
        if key not in self.values:
            return self._text("Not Found\n", 404)
        try:
            timeout = self._wait_args(request)
        except ValueError as exc:
            return self._text(f"{exc}\n", 400)
        if timeout is not None:
            last = request.query.get("last_etag") or etag(self.values[key])
            await self._wait_for_change(key, last, timeout)
        value = self.values[key]
        return self._text(value, headers={"ETag": etag(value)})

    @staticmethod
    def _wait_args(request: web.Request) -> float | None:
        """The hanging-GET timeout (``inf`` for none), or None for a plain GET."""
        if request.query.get("wait_for_change", "").lower() != "true":
            return None
        raw = request.query.get("timeout_sec")
        if raw is None:
            return float("inf")
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"timeout_sec must be a positive integer, not {raw!r}")
        return float(raw)

    async def _wait_for_change(self, key: str, last_etag: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while etag(self.values[key]) == last_etag and not self.closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await self._sleep(key, left)

    async def _sleep(self, key: str, seconds: float) -> None:
        """Wait ``seconds`` (``inf``: no limit), or until ``key`` changes or shutdown."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(future)
        timer = None if seconds == float("inf") else loop.call_later(seconds, _resolve, future)
        try:
            await future
        finally:
            waiters.discard(future)
            if timer is not None:
                timer.cancel()

    def _wake(self, path: str) -> None:
        for future in self._waiters.pop(path, ()):
            _resolve(future)

    def _target(self, kind: str, details: dict[str, Any]) -> tuple[str, str]:
        if kind == "preempt":
            if details:
                raise ValueError(f"preempt takes no details, got {sorted(details)}")
            return PREEMPTED, "TRUE"
        if kind == "maintenance":
            extra = set(details) - {"event"}
            if extra:
                raise ValueError(f"unknown maintenance details {sorted(extra)}; expected 'event'")
            event = str(details.get("event", MAINTENANCE_EVENTS[0])).upper()
            short = {"TERMINATE": MAINTENANCE_EVENTS[0], "MIGRATE": MAINTENANCE_EVENTS[1]}
            event = short.get(event, event)
            if event not in MAINTENANCE_EVENTS:
                raise ValueError(
                    f"unknown maintenance event {event!r}; "
                    f"expected {' or '.join(MAINTENANCE_EVENTS)}"
                )
            return MAINTENANCE, event
        raise ValueError(self._unknown_kind(kind))

    def _failure(self, message: str, status: int) -> web.Response:
        return self._text(f"{message}\n", status)

    def _fault_answer(self, fault: Fault, request: web.Request) -> web.StreamResponse:
        if fault.mode == "garbage":
            return web.Response(
                body=b"\x00\xff<html>garbage",
                headers={"Metadata-Flavor": FLAVOR, "ETag": "zzzz"},
                content_type="application/text",
            )
        return web.Response(text="TRUE", content_type="text/html")  # "no-header"

    @staticmethod
    def _text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            text=body,
            status=status,
            content_type="application/text",
            headers={
                "Metadata-Flavor": FLAVOR,
                "Server": "Metadata Server for VM",
                **(headers or {}),
            },
        )

    # ------------------------------------------------------------- control (HTTP)

    async def _control_set(self, request: web.Request) -> web.Response:
        async def act(body: dict[str, Any]) -> None:
            self.set(str(body.get("path", "")), str(body.get("value", "")))

        return await control_action(request, act, self.state)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``preemptwatch simulate gcp`` flags."""
    parser.add_argument(
        "--notice-after",
        type=seconds,
        metavar="SECONDS",
        help="schedule a notice this many seconds after start (default: none)",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="preempt",
        help="kind of that notice (default: %(default)s)",
    )
    parser.add_argument(
        "--maintenance-event",
        choices=MAINTENANCE_EVENTS,
        default=MAINTENANCE_EVENTS[0],
        help="value of instance/maintenance-event for --kind maintenance (default: %(default)s)",
    )
    parser.add_argument(
        "--provisioning-model",
        choices=("SPOT", "STANDARD"),
        default="SPOT",
        help="instance/scheduling/provisioning-model (default: %(default)s)",
    )
    parser.add_argument("--instance-id", default="4520031799277581759", help="instance/id")
    parser.add_argument("--name", default="preemptwatch-sim", help="instance/name")


def from_args(args: argparse.Namespace) -> GCPSimulator:
    """A simulator configured from ``add_arguments`` flags."""
    sim = GCPSimulator(
        provisioning_model=args.provisioning_model, instance_id=args.instance_id, name=args.name
    )
    if args.notice_after is not None:
        details = {"event": args.maintenance_event} if args.kind == "maintenance" else {}
        sim.schedule(args.kind, args.notice_after, **details)
    return sim
