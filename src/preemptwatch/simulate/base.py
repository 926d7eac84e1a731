"""Machinery the metadata simulators share.

`SimulatorBase` is the aiohttp app skeleton (metadata catch-all, ``/_control/schedule``,
``clear``, ``fault`` and ``state``, startup and shutdown), the queue of injected faults
and the request counters. `TimedSimulator` adds notices that appear on timers of the
serving loop (scheduled before serving, they wait for it to start). A provider supplies
its metadata handler, ``state`` and how a notice appears and is withdrawn.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web

#: How long a "timeout" fault hangs: longer than any client's timeout.
HANG_SECONDS = 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Fault:
    """One injected failure, applied to the next metadata requests (of ``method`` only,
    when given)."""

    status: int | None
    mode: str | None
    count: int
    method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "mode": self.mode, "count": self.count}


def check_fault(status: int | None, count: int, mode: str | None, modes: tuple[str, ...]) -> Fault:
    """Validate a fault request; ``ValueError`` with a clear message on bad input."""
    if mode is not None and mode not in modes:
        raise ValueError(f"unknown fault mode {mode!r}; expected one of {', '.join(modes)}")
    if (status is None) == (mode is None):
        raise ValueError("give exactly one of status or mode")
    if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
        raise ValueError(f"status must be an HTTP status code, not {status!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, not {count!r}")
    return Fault(status, mode, count)


def reset(request: web.Request) -> web.Response:
    """Drop the connection without an answer (the response returned is never sent)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)


async def control_action(
    request: web.Request,
    act: Callable[[dict[str, Any]], Awaitable[None]],
    state: Callable[[], dict[str, Any]],
) -> web.Response:
    """Run one control action on a JSON object body: 200 with the state, or 400."""
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        return web.json_response({"error": "body is not JSON"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    try:
        await act(body)
    except (TypeError, ValueError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(state())


def seconds(text: str) -> float:
    """An argparse type: a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {text!r}")
    return value


class SimulatorBase(abc.ABC):
    """The app skeleton, control API, fault queue and counters of a simulator.

    The control handlers answer with the state (400 ``{"error": ...}`` on bad input);
    a provider may override them. Subclasses that are not dataclasses call
    ``super().__init__()``; dataclasses declare ``requests``, ``_faults`` and ``_closing``.
    """

    #: The provider, as error messages name it.
    PROVIDER: ClassVar[str] = ""
    #: The fault modes `fault` accepts.
    FAULT_MODES: ClassVar[tuple[str, ...]] = ("timeout", "garbage", "reset")

    #: Metadata requests served (control requests are not counted).
    requests: int
    _faults: list[Fault]
    _closing: asyncio.Event | None

    def __init__(self) -> None:
        self.requests = 0
        #: Metadata requests served, by path.
        self.served: Counter[str] = Counter()
        self._faults = []
        self._closing = None

    # ------------------------------------------------------------ the provider's part

    @abc.abstractmethod
    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        """Answer a metadata request (every path outside ``/_control/``)."""

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """What is set, scheduled and injected, and the counters (``/_control/state``)."""

    @abc.abstractmethod
    def schedule(self, kind: str, after: float = 0.0, **details: Any) -> Any:
        """Make a notice of ``kind`` appear ``after`` seconds from now."""

    @abc.abstractmethod
    def clear(self, kind: str | None = None) -> Any:
        """Withdraw notices of ``kind`` (all when None)."""

    def _controls(self) -> dict[str, Handler]:
        """Extra ``POST /_control/...`` routes, by path."""
        return {}

    def _started(self) -> None:  # noqa: B027 - optional hook
        """Runs on the serving loop when the app starts."""

    def _stopped(self) -> None:  # noqa: B027 - optional hook
        """Runs on the serving loop when the app shuts down."""

    def _failure(self, message: str, status: int) -> web.Response:
        """The answer to a status fault (``message`` is ``simulated <status>``, or
        ``late`` after a ``timeout`` fault)."""
        return web.Response(text=message, status=status)

    def _fault_answer(self, fault: Fault, request: web.Request) -> web.StreamResponse:
        """The answer under a provider's own fault mode (``garbage`` and the like)."""
        raise NotImplementedError(f"fault mode {fault.mode!r}")

    # -------------------------------------------------------------------- faults

    def fault(self, status: int | None = None, count: int = 1, mode: str | None = None) -> None:
        """Make the next ``count`` metadata requests answer ``status``, or fail by ``mode``
        (one of `FAULT_MODES`: ``timeout`` hangs, ``reset`` drops the connection, the
        others send what the provider's module describes)."""
        self._faults.append(check_fault(status, count, mode, self.FAULT_MODES))

    def _take_fault(self, method: str | None = None) -> Fault | None:
        """The fault the next request of ``method`` meets (counted down), if any."""
        for fault in self._faults:
            if fault.method is None or fault.method == method:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _apply_fault(self, request: web.Request) -> web.StreamResponse | None:
        """The answer an injected fault makes of ``request``, or None without a fault."""
        fault = self._take_fault(request.method)
        if fault is None:
            return None
        if fault.status is not None:
            return self._failure(f"simulated {fault.status}", fault.status)
        if fault.mode == "timeout":
            await self._hang(HANG_SECONDS)
            return self._failure("late", 504)
        if fault.mode == "reset":
            return reset(request)
        return self._fault_answer(fault, request)

    async def _hang(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the server shuts down."""
        closing = self._closing or asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing.wait(), seconds)

    @property
    def closing(self) -> bool:
        """Whether the server is shutting down."""
        return self._closing is not None and self._closing.is_set()

    def _count(self, key: str) -> None:
        self.requests += 1
        self.served[key] += 1

    # ---------------------------------------------------------------- the server

    def app(self) -> web.Application:
        """The aiohttp application: the metadata paths plus ``/_control/``."""
        app = web.Application()
        app.router.add_post("/_control/schedule", self._control_schedule)
        app.router.add_post("/_control/clear", self._control_clear)
        app.router.add_post("/_control/fault", self._control_fault)
        for path, handler in self._controls().items():
            app.router.add_post(path, handler)
        app.router.add_get("/_control/state", self._control_state)
        app.router.add_route("*", "/{path:.*}", self._metadata)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._closing = asyncio.Event()  # fresh for this loop (the simulator may be reused)
        self._started()

    async def _on_shutdown(self, app: web.Application) -> None:
        if self._closing is not None:
            self._closing.set()  # release hanging requests and "timeout" faults
        self._stopped()

    # ------------------------------------------------------------ control (HTTP)

    async def _control_schedule(self, request: web.Request) -> web.Response:
        async def act(body: dict[str, Any]) -> None:
            details = {k: v for k, v in body.items() if k not in ("kind", "after")}
            self.schedule(str(body.get("kind", "")), body.get("after", 0.0), **details)

        return await control_action(request, act, self.state)

    async def _control_clear(self, request: web.Request) -> web.Response:
        async def act(body: dict[str, Any]) -> None:
            self.clear(body.get("kind"))

        return await control_action(request, act, self.state)

    async def _control_fault(self, request: web.Request) -> web.Response:
        async def act(body: dict[str, Any]) -> None:
            self.fault(body.get("status"), body.get("count", 1), body.get("mode"))

        return await control_action(request, act, self.state)

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())


@dataclass(eq=False)
class Scheduled:
    """A notice due at ``at`` (monotonic seconds)."""

    kind: str
    at: float
    details: dict[str, Any]
    handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"kind": self.kind, "in": round(max(0.0, self.at - now), 3), **self.details}


class TimedSimulator(SimulatorBase):
    """A simulator whose notices appear on timers of the serving loop.

    A provider lists its ``KINDS`` and supplies `_check` (validate a notice), `_appear`
    (make it visible now) and `_withdraw` (take notices of a kind away).
    """

    KINDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self._timers: list[Scheduled] = []
        self._deferred: list[tuple[str, float, dict[str, Any]]] = []

    @abc.abstractmethod
    def _check(self, kind: str, details: dict[str, Any]) -> None:
        """``ValueError`` for a kind or details this simulator cannot schedule."""

    @abc.abstractmethod
    def _appear(self, kind: str, details: dict[str, Any]) -> None:
        """Make a notice visible now."""

    @abc.abstractmethod
    def _withdraw(self, kind: str | None) -> None:
        """Take visible notices of ``kind`` (all when None) away."""

    def schedule(self, kind: str, after: float = 0.0, **details: Any) -> None:
        """Make a notice appear ``after`` seconds from now. Without a running loop (before
        serving) it waits for the server to start."""
        self._check(kind, details)
        if not isinstance(after, (int, float)) or after < 0:
            raise ValueError(f"after must be a non-negative number of seconds, not {after!r}")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._deferred.append((kind, float(after), dict(details)))
            return
        if after == 0:
            self._appear(kind, details)
            return
        pending = Scheduled(kind, time.monotonic() + after, dict(details))
        pending.handle = loop.call_later(after, self._fire, pending)
        self._timers.append(pending)

    def clear(self, kind: str | None = None) -> None:
        """Withdraw notices of ``kind`` (all when None), scheduled ones included."""
        if kind is not None and kind not in self.KINDS:
            raise ValueError(self._unknown_kind(kind))
        for pending in list(self._timers):
            if kind is None or pending.kind == kind:
                pending.cancel()
                self._timers.remove(pending)
        self._deferred = [d for d in self._deferred if kind is not None and d[0] != kind]
        self._withdraw(kind)

    def _unknown_kind(self, kind: str) -> str:
        kinds = ", ".join(self.KINDS)
        return f"unknown kind {kind!r} for {self.PROVIDER}; expected one of {kinds}"

    def _scheduled(self) -> list[dict[str, Any]]:
        """The pending notices, for ``state``."""
        now = time.monotonic()
        return [p.to_dict(now) for p in self._timers]

    def _fire(self, pending: Scheduled) -> None:
        if pending in self._timers:
            self._timers.remove(pending)
        self._appear(pending.kind, pending.details)

    def _started(self) -> None:
        deferred, self._deferred = self._deferred, []
        for kind, after, details in deferred:
            self.schedule(kind, after, **details)

    def _stopped(self) -> None:
        for pending in self._timers:
            pending.cancel()
        self._timers.clear()
