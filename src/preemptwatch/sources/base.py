"""The interface every source implements, and the polling loop most of them share."""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_random_exponential,
)

from ..notice import Notice

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("preemptwatch.sources")


class SourceError(Exception):
    """A source could not read its provider; logged and retried, never raised to the user."""


class Sink(Protocol):
    """Where a source reports to (the watcher)."""

    def notice(self, notice: Notice) -> None:
        """A notice appeared (repeats are fine: the watcher de-duplicates)."""

    def clear(self, source: str, notice_id: str) -> None:
        """An advisory notice went away (rebalance withdrawn, event cancelled)."""

    def poll_ok(self, source: str) -> None:
        """A poll of the provider succeeded."""

    def poll_error(self, source: str, error: BaseException) -> None:
        """A poll of the provider failed (it will be retried)."""


@dataclass
class SourceContext:
    """What a running source gets from the watcher."""

    sink: Sink
    session: aiohttp.ClientSession
    options: dict[str, Any] = field(default_factory=dict)


class Source(abc.ABC):
    """One kind of warning: a metadata endpoint, a signal, a sidecar.

    A new source is one new module with one subclass, listed in ``sources/__init__.py``.
    """

    #: The source's name, one of ``notice.SOURCE_NAMES``.
    name: ClassVar[str]

    def prepare(self, report: Callable[[Notice], None]) -> None:  # noqa: B027 - optional
        """Runs in the caller's thread before the watcher starts (e.g. to install signal
        handlers, which only the main thread may do). ``report`` delivers a notice to the
        watcher from any thread."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Undo ``prepare`` (restore signal handlers); called when the watcher stops."""

    @classmethod
    async def detect(cls, session: aiohttp.ClientSession) -> bool:
        """Whether this source applies on this machine. Must be quick and never raise."""
        return False

    @abc.abstractmethod
    async def run(self, ctx: SourceContext) -> None:
        """Watch until cancelled, reporting to ``ctx.sink``. Errors are the source's to
        log and retry; an exception escaping here makes the watcher restart the source."""


class PollingSource(Source):
    """A source that asks its provider every ``interval`` seconds.

    Subclasses implement :meth:`poll`. A failing poll is logged and retried with
    jittered exponential backoff (capped at ``max_backoff``); a success resets it.
    """

    interval: float = 1.0
    max_backoff: float = 30.0

    def __init__(self, interval: float | None = None) -> None:
        if interval is not None:
            if interval <= 0:
                raise ValueError("poll interval must be positive")
            self.interval = interval

    @abc.abstractmethod
    async def poll(self, ctx: SourceContext) -> None:
        """One look at the provider; report through ``ctx.sink``; raise on failure."""

    async def run(self, ctx: SourceContext) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll(ctx)
            except Exception as exc:
                await self._recover(ctx, exc)
            ctx.sink.poll_ok(self.name)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def _recover(self, ctx: SourceContext, error: Exception) -> None:
        """After a failed poll: retry with jittered exponential backoff until one works.

        The steady state (polls that succeed) never enters tenacity: it costs tens of
        microseconds per poll, which an idle watcher polling every second would feel.
        """
        retrying = backoff(self.interval, self.max_backoff, self._before_retry(ctx))
        first: Exception | None = error
        async for attempt in retrying:
            with attempt:
                if first is not None:  # attempt 1 is the poll that already failed
                    failed, first = first, None
                    raise failed
                await self.poll(ctx)

    def _before_retry(self, ctx: SourceContext) -> Callable[[RetryCallState], None]:
        return retry_reporter(
            ctx, self.name, log, "%s: poll failed (attempt %d, retrying in %.1fs): %s", self.name
        )


def backoff(
    interval: float,
    max_backoff: float,
    before_sleep: Callable[[RetryCallState], None] | None = None,
    *,
    attempts: int | None = None,
    errors: type[Exception] = Exception,
) -> AsyncRetrying:
    """Retry ``errors`` with jittered exponential backoff (base ``interval``, capped at
    ``max_backoff``), forever or up to ``attempts`` tries; when it gives up, the last
    error itself is raised."""
    return AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_random_exponential(multiplier=interval, max=max_backoff),
        stop=stop_never if attempts is None else stop_after_attempt(attempts),
        before_sleep=before_sleep,
        reraise=True,
    )


def retry_reporter(
    ctx: SourceContext, name: str, logger: logging.Logger, message: str, *args: Any
) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep``: report the failed attempt to the sink as source
    ``name`` and log it (WARNING on the 1st and every 30th attempt, else DEBUG).
    ``message`` is formatted with ``args``, then the attempt number, delay and error."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return
        ctx.sink.poll_error(name, exc)
        delay = state.next_action.sleep if state.next_action else 0.0
        n = state.attempt_number
        level = logging.WARNING if n == 1 or n % 30 == 0 else logging.DEBUG
        logger.log(level, message, *args, n, delay, exc)

    return before_sleep
