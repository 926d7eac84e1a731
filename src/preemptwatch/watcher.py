"""The `Watcher`: runs sources side by side and turns their notices into one decision.

It runs on an asyncio loop: either the caller's (``async with Watcher(...)``) or its own
in a daemon thread (``watcher.start_in_thread()``, what ``start_watcher()`` uses), so plain
synchronous training scripts work. ``watcher.preempting`` is a plain attribute: reading it
every training step costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .notice import Notice

if TYPE_CHECKING:
    import aiohttp

    from .sources.base import Source

log = logging.getLogger("preemptwatch")

Callback = Callable[[Notice], "Awaitable[Any] | Any"]


@dataclass
class SourceHealth:
    """What the watcher knows of one source's polling (for logs and metrics)."""

    polls: int = 0
    errors: int = 0
    last_ok: float | None = None
    last_error: str | None = None
    running: bool = False


class Watcher:
    """Watches every given source; the first notice that counts wins.

    A notice counts as preempting when its kind is final (terminate, stop, hibernate,
    preempt, signal, time-limit), when it is a rebalance recommendation and
    ``count_rebalance`` is set, or when it is a maintenance event due within
    ``maintenance_lead`` seconds (a later one is promoted when that time comes, unless it
    is cancelled first). On that first notice the watcher sets ``preempting``, calls the
    markers (``mark_preempting()`` on the active runs) and then each callback in order,
    each bounded by the time the deadline leaves.
    """

    def __init__(
        self,
        sources: Iterable[Source] = (),
        callbacks: Iterable[Callback] = (),
        *,
        detect: Sequence[str] = (),
        on_advisory: Callback | None = None,
        count_rebalance: bool = False,
        maintenance_lead: float = 600.0,
        mark: bool = True,
        http_timeout: float = 2.0,
        detect_timeout: float = 1.0,
    ) -> None:
        #: True once a notice that counts has arrived. A plain attribute: cheap to read.
        self.preempting: bool = False
        #: The first notice that counted, or None.
        self.notice: Notice | None = None
        #: Every notice delivered so far (advisory ones too), in arrival order.
        self.notices: list[Notice] = []
        #: Per-source polling health.
        self.health: dict[str, SourceHealth] = {}
        self.sources: list[Source] = list(sources)
        self.callbacks: list[Callback] = list(callbacks)
        self.on_advisory = on_advisory
        self.count_rebalance = count_rebalance
        self.maintenance_lead = maintenance_lead
        self.mark = mark
        self.http_timeout = http_timeout
        self.detect_timeout = detect_timeout
        self._detect = list(detect)
        self._seen: set[tuple[str, str]] = set()
        self._pending: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._listeners: list[Callable[[str, Any], None]] = []
        self._event = threading.Event()
        self._async_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queue: asyncio.Queue[Notice] | None = None
        self._prepared = False
        self._closed = False
        self._early: list[Notice] = []  # reported before the loop ran
        self._early_lock = threading.Lock()

    # ----------------------------------------------------------------- public API

    def wait(self, timeout: float | None = None) -> bool:
        """Block until preempting (True) or until ``timeout`` seconds pass (False)."""
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Async form of :meth:`wait`; must run on the watcher's loop."""
        if self._async_event is None:
            raise RuntimeError("watcher is not started on this loop")
        try:
            await asyncio.wait_for(self._async_event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def add_callback(self, callback: Callback) -> None:
        """Call ``callback(notice)`` on the first notice that counts (sync or async)."""
        self.callbacks.append(callback)

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        """Low-level hook: ``listener(event, data)`` for "notice", "clear", "poll_ok",
        "poll_error" and "preempting". Runs on the watcher's loop; must be quick."""
        self._listeners.append(listener)

    @property
    def running(self) -> bool:
        """Whether the watcher has started and not stopped."""
        return self._loop is not None and not self._closed

    async def start(self) -> Watcher:
        """Start on the running loop; returns at once (detection goes on in background)."""
        if self._loop is not None:
            raise RuntimeError("watcher already started")
        import aiohttp

        self._async_event = asyncio.Event()
        if self._event.is_set():
            self._async_event.set()
        self._queue = asyncio.Queue()
        self._prepare()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.http_timeout),
            trust_env=False,  # metadata endpoints never go through a proxy
        )
        with self._early_lock:
            self._loop = asyncio.get_running_loop()
            early, self._early = self._early, []
        self._spawn(self._dispatch(), "dispatch")
        for notice in early:
            self.notice_received(notice)
        for source in self.sources:
            self._start_source(source)
        if self._detect:
            self._spawn(self._detect_sources(), "detect")
        return self

    async def aclose(self) -> None:
        """Stop every source and close the HTTP session."""
        if self._closed:
            return
        self._closed = True
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._thread is None:
            self._unprepare()

    async def __aenter__(self) -> Watcher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start_in_thread(self, ready_timeout: float = 5.0) -> Watcher:
        """Run the watcher on its own loop in a daemon thread; returns once it runs."""
        if self._thread is not None:
            return self
        self._prepare()  # signal handlers must be installed from the caller's thread
        started = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                errors.append(exc)
                started.set()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="preemptwatch", daemon=True)
        self._thread.start()
        started.wait(ready_timeout)
        if errors:
            raise errors[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the watcher (from any thread); restores signal handlers."""
        loop = self._loop
        if loop is None or self._closed:
            self._unprepare()
            return
        if self._thread is not None:
            if self._thread is threading.current_thread():
                loop.call_soon(loop.stop)
                return
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout)
            self._unprepare()
            return
        # Started on the caller's loop.
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._spawn(self.aclose(), "close")
        else:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout)

    # ------------------------------------------------------------- the Sink side

    def notice_threadsafe(self, notice: Notice) -> None:
        """Report a notice from any thread (signal handlers use this)."""
        with self._early_lock:
            loop = self._loop
            if loop is None:
                self._early.append(notice)
                return
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self.notice_received, notice)

    def notice_received(self, notice: Notice) -> None:
        """Sink: a source saw ``notice``. De-duplicated by ``(source, id)``."""
        if notice.key in self._seen:
            return
        self._seen.add(notice.key)
        self.notices.append(notice)
        self._emit("notice", notice)
        if self._counts_now(notice):
            self._preempt(notice)
            return
        log.info("advisory %s", notice)
        if self.on_advisory is not None:
            self._spawn(self._call(self.on_advisory, notice), "advisory")
        if notice.kind == "maintenance" and notice.deadline is not None and self._loop:
            delay = (notice.seconds_left() or 0.0) - self.maintenance_lead
            self._pending[notice.key] = self._loop.call_later(
                max(0.0, delay), self._promote, notice
            )

    def notice_cleared(self, source: str, notice_id: str) -> None:
        """Sink: an advisory notice went away (cancelled event, withdrawn rebalance)."""
        key = (source, notice_id)
        handle = self._pending.pop(key, None)
        if handle is not None:
            handle.cancel()
        if key in self._seen:
            self._seen.discard(key)  # it may come back, and then it is news again
            log.info("%s notice %s cleared", source, notice_id)
            self._emit("clear", key)

    def poll_ok(self, source: str) -> None:
        """Sink: a poll of ``source`` succeeded."""
        health = self.health.setdefault(source, SourceHealth())
        health.polls += 1
        health.last_ok = time.time()
        self._emit("poll_ok", source)

    def poll_error(self, source: str, error: BaseException) -> None:
        """Sink: a poll of ``source`` failed."""
        health = self.health.setdefault(source, SourceHealth())
        health.errors += 1
        health.last_error = f"{type(error).__name__}: {error}"
        self._emit("poll_error", (source, error))

    # ------------------------------------------------------------------ internals

    def _counts_now(self, notice: Notice) -> bool:
        if not notice.advisory:
            return True
        if notice.kind == "rebalance":
            return self.count_rebalance
        left = notice.seconds_left()
        return left is None or left <= self.maintenance_lead

    def _promote(self, notice: Notice) -> None:
        self._pending.pop(notice.key, None)
        if notice.key in self._seen:
            self._preempt(notice)

    def _preempt(self, notice: Notice) -> None:
        if self.preempting:
            log.info("further %s", notice)
            return
        self.notice = notice
        self.preempting = True
        self._event.set()
        if self._async_event is not None:
            self._async_event.set()
        log.warning("preempting: %s", notice)
        self._emit("preempting", notice)
        if self._queue is not None:
            self._queue.put_nowait(notice)

    async def _dispatch(self) -> None:
        from .marks import mark_all

        assert self._queue is not None
        while True:
            notice = await self._queue.get()
            if self.mark:
                self._spawn(mark_all(notice), "mark")
            for callback in list(self.callbacks):
                await self._call(callback, notice)

    async def _call(self, callback: Callback, notice: Notice) -> None:
        """Run one callback, bounded by the notice's deadline; log, never raise."""
        try:
            if inspect.iscoroutinefunction(callback):
                awaitable: Awaitable[Any] = callback(notice)
            else:
                awaitable = asyncio.get_running_loop().run_in_executor(None, callback, notice)
            result = await asyncio.wait_for(awaitable, notice.seconds_left())
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, notice.seconds_left())
        except asyncio.TimeoutError:
            log.warning("callback %r did not finish before the deadline", callback)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("callback %r failed for %s", callback, notice)

    def _start_source(self, source: Source) -> None:
        self.health.setdefault(source.name, SourceHealth())
        self._spawn(self._supervise(source), f"source-{source.name}")

    async def _supervise(self, source: Source) -> None:
        """Run a source; restart it with jittered backoff whenever it crashes."""
        from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

        from .sources.base import SourceContext

        assert self._session is not None
        ctx = SourceContext(sink=self._sink(), session=self._session)
        health = self.health[source.name]
        health.running = True

        def crashed(state: Any) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.error("source %s crashed, restarting: %r", source.name, exc, exc_info=exc)
            if exc is not None:
                self.poll_error(source.name, exc)

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception),
                wait=wait_random_exponential(multiplier=1, max=60),
                before_sleep=crashed,
                reraise=True,
            ):
                with attempt:
                    await source.run(ctx)
            log.info("source %s finished", source.name)
        finally:
            health.running = False

    async def _detect_sources(self) -> None:
        from .sources import source_class

        assert self._session is not None
        session = self._session

        async def probe(name: str) -> None:
            try:
                cls = source_class(name)
                found = await asyncio.wait_for(cls.detect(session), self.detect_timeout)
            except Exception as exc:
                log.debug("source %s not detected: %r", name, exc)
                return
            if found and not self._closed:
                log.info("detected %s; watching it", name)
                source = cls()
                self.sources.append(source)
                self._start_source(source)

        await asyncio.gather(*(probe(n) for n in self._detect))

    def _sink(self) -> Any:
        watcher = self

        class _Sink:
            def notice(self, notice: Notice) -> None:
                watcher.notice_received(notice)

            def clear(self, source: str, notice_id: str) -> None:
                watcher.notice_cleared(source, notice_id)

            def poll_ok(self, source: str) -> None:
                watcher.poll_ok(source)

            def poll_error(self, source: str, error: BaseException) -> None:
                watcher.poll_error(source, error)

        return _Sink()

    def _emit(self, event: str, data: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, data)
            except Exception:
                log.exception("listener %r failed on %s", listener, event)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"preemptwatch-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        for source in self.sources:
            try:
                source.prepare(self.notice_threadsafe)
            except Exception:
                log.exception("source %s could not prepare; it may miss notices", source.name)

    def _unprepare(self) -> None:
        if not self._prepared:
            return
        self._prepared = False
        for source in self.sources:
            try:
                source.close()
            except Exception:
                log.exception("source %s could not close cleanly", source.name)
