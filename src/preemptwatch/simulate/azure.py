"""Azure Scheduled Events (IMDS): Preempt, Freeze, Reboot, Redeploy, Terminate for a scale set.

Serves ``/metadata/scheduledevents`` as Azure's instance metadata service does: the
``Metadata: true`` header and an ``api-version`` are required (400 without), a request
with ``X-Forwarded-For`` is refused (403), the document's ``DocumentIncarnation`` grows on
every change, events name the VMs they target in ``Resources`` (the scale set's other
VMs get them too), turn from ``Scheduled`` to ``Started`` at ``NotBefore`` or when
acknowledged with ``POST {"StartRequests": [{"EventId": ...}]}``. The very first call may
be slowed down (``first_call_delay``), as the real service's is while it turns on.
``/metadata/instance/compute/{name,vmId,...}`` answer with ``format=text``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from .base import Fault, TimedSimulator, seconds

EVENTS_PATH = "/metadata/scheduledevents"
INSTANCE_PATH = "/metadata/instance"
COMPUTE_PATH = INSTANCE_PATH + "/compute/"
NEWEST = "2020-07-01"
EVENTS_API_VERSIONS = ("2017-11-01", "2019-01-01", "2019-08-01", NEWEST)
KINDS = ("preempt", "maintenance")
MAINTENANCE_TYPES = ("Freeze", "Reboot", "Redeploy", "Terminate")
FAULT_MODES = ("timeout", "garbage", "reset")
#: Seconds from an event's appearance to its NotBefore, by type (Azure's minimums).
NOTICE_SECONDS = {
    "Preempt": 30.0,
    "Freeze": 900.0,
    "Reboot": 900.0,
    "Redeploy": 600.0,
    "Terminate": 300.0,
}
DESCRIPTIONS = {
    "Preempt": "Virtual machine is being evicted from Azure Spot.",
    "Freeze": "Host server is undergoing maintenance.",
    "Reboot": "Virtual machine is going to be restarted as requested by authorized user.",
    "Redeploy": "Virtual machine is being moved to another host.",
    "Terminate": "Virtual machine is being deleted.",
}


def rfc1123(when: datetime) -> str:
    """``Mon, 19 Sep 2016 18:29:47 GMT``, the form of ``NotBefore``."""
    return format_datetime(when.astimezone(timezone.utc), usegmt=True)


@dataclass(eq=False)
class Event:
    """One scheduled event, as served (plus the timer that starts it)."""

    event_id: str
    kind: str
    event_type: str
    resources: list[str]
    not_before: datetime | None
    status: str = "Scheduled"
    description: str = ""
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "EventId": self.event_id,
            "EventStatus": self.status,
            "EventType": self.event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(self.resources),
            "NotBefore": rfc1123(self.not_before) if self.not_before else "",
            "Description": self.description,
            "EventSource": "Platform",
            "DurationInSeconds": 9 if self.event_type == "Freeze" else -1,
        }


class AzureSimulator(TimedSimulator):
    """An in-memory Azure IMDS with Scheduled Events (see the module docstring).

    Notices (`schedule`) take the details ``event_type`` (``Preempt`` for kind
    ``preempt``; ``Freeze`` (default), ``Reboot``, ``Redeploy`` or ``Terminate`` for
    ``maintenance``), ``resources`` (VM names; default this VM), ``not_before`` (seconds
    from appearance, or ``""`` for an empty NotBefore; default Azure's notice for the
    type) and ``event_id``; `clear` cancels or completes them. Faults (`fault`): a status,
    or ``timeout``, ``garbage`` (200 with a truncated document) or ``reset``.
    """

    PROVIDER = "Azure"
    KINDS = KINDS
    FAULT_MODES = FAULT_MODES

    def __init__(
        self,
        *,
        vm_name: str = "preemptwatch-sim_0",
        scale_set: tuple[str, ...] | list[str] | None = None,
        vm_id: str = "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
        first_call_delay: float = 0.0,
    ) -> None:
        if first_call_delay < 0:
            raise ValueError("first_call_delay must not be negative")
        super().__init__()
        self.vm_name = vm_name
        #: Every VM of the scale set (events may target any of them).
        self.scale_set = list(scale_set) if scale_set else [vm_name, "preemptwatch-sim_1"]
        if vm_name not in self.scale_set:
            self.scale_set.insert(0, vm_name)
        self.vm_id = vm_id
        self.first_call_delay = first_call_delay
        self.incarnation = 1
        self.events: dict[str, Event] = {}
        #: Event IDs acknowledged with a StartRequests POST, in order.
        self.acknowledged: list[str] = []
        self._first_call = True

    # ------------------------------------------------------------- control (Python)

    def start(self, event_id: str) -> None:
        """Turn a Scheduled event to Started (what NotBefore or an acknowledge does)."""
        event = self.events.get(event_id)
        if event is None:
            raise ValueError(f"no event {event_id!r}")
        if event.status != "Started":
            if event.timer is not None:
                event.timer.cancel()
            event.status = "Started"
            self.incarnation += 1

    def document(self) -> dict[str, Any]:
        """The Scheduled Events document, as served."""
        return {
            "DocumentIncarnation": self.incarnation,
            "Events": [e.to_json() for e in self.events.values()],
        }

    def state(self) -> dict[str, Any]:
        """The document, what is scheduled, and the request counters."""
        return {
            "document": self.document(),
            "scheduled": self._scheduled(),
            "acknowledged": list(self.acknowledged),
            "faults": [f.to_dict() for f in self._faults],
            "requests": self.requests,
            "served": dict(self.served),
        }

    # ----------------------------------------------------------------- the server

    def _withdraw(self, kind: str | None) -> None:
        gone = [e for e in self.events.values() if kind is None or e.kind == kind]
        for event in gone:
            if event.timer is not None:
                event.timer.cancel()
            del self.events[event.event_id]
        if gone:
            self.incarnation += 1

    def _stopped(self) -> None:
        super()._stopped()
        for event in self.events.values():
            if event.timer is not None:
                event.timer.cancel()

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        self._count(request.path)
        if "X-Forwarded-For" in request.headers:
            return _error("Forbidden. Request with X-Forwarded-For header refused.", 403)
        if request.headers.get("Metadata", "").lower() != "true":
            return _error("Bad request. Required metadata header not specified", 400)
        if "api-version" not in request.query:
            return _error("Bad request. api-version was not specified in the request.", 400)
        injected = await self._apply_fault(request)
        if injected is not None:
            return injected
        if request.path.rstrip("/") == EVENTS_PATH:
            return await self._events(request)
        if request.path.startswith(COMPUTE_PATH) or request.path.rstrip("/") == INSTANCE_PATH:
            return self._instance(request)
        return _error("Not found", 404)

    async def _events(self, request: web.Request) -> web.Response:
        if request.query["api-version"] not in EVENTS_API_VERSIONS:
            body = {"error": "Bad request. api-version is invalid.", "newest-versions": [NEWEST]}
            return web.json_response(body, status=400)
        if request.method == "POST":
            return await self._acknowledge(request)
        if request.method != "GET":
            return _error("Method not allowed", 405)
        if self._first_call and self.first_call_delay:
            await self._hang(self.first_call_delay)
        self._first_call = False
        return web.json_response(self.document())

    async def _acknowledge(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            ids = [str(item["EventId"]) for item in body["StartRequests"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            return _error('Bad request. Expected {"StartRequests": [{"EventId": ...}]}', 400)
        unknown = [i for i in ids if i not in self.events]
        if unknown:
            return _error(f"Bad request. Unknown EventId {unknown[0]}", 400)
        for event_id in ids:
            self.acknowledged.append(event_id)
            self.start(event_id)
        return web.Response(status=200)

    def _instance(self, request: web.Request) -> web.Response:
        compute = {
            "name": self.vm_name,
            "vmId": self.vm_id,
            "location": "westeurope",
            "priority": "Spot",
            "evictionPolicy": "Deallocate",
            "vmScaleSetName": "preemptwatch-sim",
        }
        if request.path.rstrip("/") == INSTANCE_PATH:
            return web.json_response({"compute": compute, "network": {"interface": []}})
        key = request.path[len(COMPUTE_PATH) :].strip("/")
        if key not in compute:
            return _error("Not found", 404)
        fmt = request.query.get("format")
        if fmt == "text":
            return web.Response(text=compute[key], content_type="text/plain")
        if fmt == "json":
            return web.json_response(compute[key])
        return _error("Bad request. Query parameter format=text is required for leaf nodes.", 400)

    def _failure(self, message: str, status: int) -> web.Response:
        return _error(message, status)

    def _fault_answer(self, fault: Fault, request: web.Request) -> web.StreamResponse:
        body = '{"DocumentIncarnation": 9, "Events": [{"EventId": "'  # "garbage"
        return web.Response(text=body, content_type="application/json")

    def _appear(self, kind: str, details: dict[str, Any]) -> None:
        event_type = details.get("event_type") or ("Preempt" if kind == "preempt" else "Freeze")
        ahead = details.get("not_before", NOTICE_SECONDS[event_type])
        not_before = None if ahead == "" else datetime.now(timezone.utc) + timedelta(seconds=ahead)
        if not_before is not None:
            not_before = not_before.replace(microsecond=0)
        event = Event(
            event_id=str(details.get("event_id") or str(uuid.uuid4()).upper()),
            kind=kind,
            event_type=event_type,
            resources=list(details.get("resources") or [self.vm_name]),
            not_before=not_before,
            description=DESCRIPTIONS[event_type],
        )
        self.events[event.event_id] = event
        self.incarnation += 1
        if not_before is not None:
            delay = max(0.0, (not_before - datetime.now(timezone.utc)).total_seconds())
            event.timer = asyncio.get_running_loop().call_later(delay, self._begin, event)

    def _begin(self, event: Event) -> None:
        event.timer = None
        if self.events.get(event.event_id) is event:
            self.start(event.event_id)

    def _check(self, kind: str, details: dict[str, Any]) -> None:
        """``ValueError`` for a kind or details this simulator cannot schedule."""
        if kind not in KINDS:
            raise ValueError(self._unknown_kind(kind))
        extra = set(details) - {"event_type", "resources", "not_before", "event_id"}
        if extra:
            raise ValueError(f"unknown details {sorted(extra)}")
        event_type = details.get("event_type")
        allowed = ("Preempt",) if kind == "preempt" else MAINTENANCE_TYPES
        if event_type is not None and event_type not in allowed:
            raise ValueError(f"event_type for {kind} must be one of {', '.join(allowed)}")
        resources = details.get("resources")
        if resources is not None and (
            not isinstance(resources, list) or not all(isinstance(r, str) for r in resources)
        ):
            raise ValueError("resources must be a list of VM names")
        ahead = details.get("not_before")
        if ahead is not None and ahead != "" and (not isinstance(ahead, (int, float)) or ahead < 0):
            raise ValueError('not_before must be seconds ahead (>= 0) or ""')


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``preemptwatch simulate azure`` flags."""
    parser.add_argument(
        "--notice-after",
        type=seconds,
        metavar="SECONDS",
        help="schedule an event this many seconds after start (default: none)",
    )
    parser.add_argument(
        "--kind", choices=KINDS, default="preempt", help="that event's kind (default: %(default)s)"
    )
    parser.add_argument(
        "--event-type",
        choices=MAINTENANCE_TYPES,
        default="Freeze",
        help="EventType for --kind maintenance (default: %(default)s)",
    )
    parser.add_argument(
        "--not-before",
        type=seconds,
        metavar="SECONDS",
        help="NotBefore this many seconds after the event appears (default: Azure's notice)",
    )
    parser.add_argument(
        "--for-vm",
        metavar="NAME",
        help="the VM the event targets (default: this VM; another name rehearses a scale set)",
    )
    parser.add_argument("--vm-name", default="preemptwatch-sim_0", help="compute/name")
    parser.add_argument(
        "--first-call-delay",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="delay the first Scheduled Events call, as Azure's first call can take minutes",
    )


def from_args(args: argparse.Namespace) -> AzureSimulator:
    """A simulator configured from ``add_arguments`` flags."""
    sim = AzureSimulator(vm_name=args.vm_name, first_call_delay=args.first_call_delay)
    if args.notice_after is not None:
        details: dict[str, Any] = {}
        if args.kind == "maintenance":
            details["event_type"] = args.event_type
        if args.not_before is not None:
            details["not_before"] = args.not_before
        if args.for_vm:
            details["resources"] = [args.for_vm]
        sim.schedule(args.kind, args.notice_after, **details)
    return sim
