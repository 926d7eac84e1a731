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
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .notice import Notice

if TYPE_CHECKING:
    import aiohttp

    from .sources.base import Source

log = logging.getLogger("preemptwatch")

Callback = Callable[[Notice], "Awaitable[Any] | Any"]

#: Even a notice whose deadline has passed gives each callback this long.
MIN_CALLBACK_SECONDS = 0.5
#: How long stopping waits for the watcher's tasks to end.
CLOSE_TIMEOUT = 2.0
#: The interpreter's thread switch interval while a notice is being handled.
BOOST_SWITCH_INTERVAL = 0.0005


def _time_left(notice: Notice) -> float | None:
    left = notice.seconds_left()
    return None if left is None else max(left, MIN_CALLBACK_SECONDS)


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
    is cancelled first). A ``migrate`` notice (a live migration) never counts. On that
    first notice the watcher sets ``preempting``, calls the
    markers (``mark_preempting()`` on the active runs) and, meanwhile, each callback in
    order, each bounded by the time the deadline leaves. `wait` returns once
    ``preempting`` is set; `wait_handled` once markers and callbacks are done.
    Notices may be reported from any thread or a signal handler
    (`notice_threadsafe`); the rest of the watcher's state lives on its loop.
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
        detect_options: Mapping[str, Mapping[str, Any]] | None = None,
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
        self._detect_options = {k: dict(v) for k, v in (detect_options or {}).items()}
        self._seen: set[tuple[str, str]] = set()
        self._pending: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._listeners: list[Callable[[str, Any], None]] = []
        self._event = threading.Event()
        self._handled = threading.Event()
        self._loop_ready = threading.Event()  # the thread runner's loop is up (or failed)
        self._ready = threading.Event()  # running, and platform probing has finished
        self._executor: ThreadPoolExecutor | None = None
        self._saved_switch: float | None = None  # see _boost
        self._async_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queue: asyncio.Queue[Notice] | None = None
        self._prepared = False
        self._closed = False
        # Notices reported from other threads or signal handlers, drained on the loop.
        # A deque: append and popleft are atomic, so reporting never takes a lock.
        self._inbox: deque[Notice] = deque()

    # ----------------------------------------------------------------- public API

    def wait(self, timeout: float | None = None) -> bool:
        """Block until preempting (True) or until ``timeout`` seconds pass (False)."""
        return self._event.wait(timeout)

    def wait_handled(self, timeout: float | None = None) -> bool:
        """Block until the first notice has been handled: the markers and every callback
        have returned (or run out of time). True if so, False after ``timeout`` seconds.
        A script that exits on ``preempting`` waits on this so its checkpoint callback
        and the run's mark complete first."""
        return self._handled.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the watcher runs and has finished probing for the platform (so
        ``sources`` lists everything it watches). False after ``timeout`` seconds."""
        return self._ready.wait(timeout)

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
        """Whether the watcher has started (or is starting, in its thread) and not stopped."""
        return (self._loop is not None or self._thread is not None) and not self._closed

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
        # Callbacks and markers get their own threads, one started now and left idle
        # (no CPU) so the first callback does not wait for a thread to be created.
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="preemptwatch-callback")
        self._executor.submit(int)
        self._loop = asyncio.get_running_loop()
        self._spawn(self._dispatch(), "dispatch")
        self._drain_inbox()  # anything reported before the loop was known
        for source in self.sources:
            self._start_source(source)
        if self._detect:
            self._spawn(self._detect_sources(), "detect")
        else:
            self._ready.set()
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
        if tasks:
            # Bounded: a task that swallowed its cancellation (asyncio.wait_for in
            # Python 3.11 can, when the awaited future completes at the same moment)
            # must not hang the stop.
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in pending:
                log.debug("task %s did not stop within %ss", task.get_name(), CLOSE_TIMEOUT)
        if self._session is not None:
            await self._session.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # a running callback still runs to its end
        self._unboost()
        if self._thread is None:
            self._unprepare()

    async def __aenter__(self) -> Watcher:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start_in_thread(self, wait: float = 0.0) -> Watcher:
        """Run the watcher on its own loop in a daemon thread (what `start_watcher` does).

        Signal handlers are installed here, in the caller's thread; the rest (importing
        aiohttp, opening the HTTP session, probing) happens in the new thread, so this
        returns at once. Notices that arrive before the loop runs are kept and handled as
        soon as it does. ``wait`` > 0 blocks up to that many seconds for the loop to run.
        """
        if self._thread is not None:
            return self
        self._prepare()  # signal handlers must be installed from the caller's thread

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                try:
                    loop.run_until_complete(self.start())
                except BaseException:
                    log.exception("preemptwatch: the watcher could not start")
                    self._closed = True
                    return
                finally:
                    self._loop_ready.set()
                loop.run_forever()  # until stop() schedules loop.stop
            finally:
                loop.run_until_complete(self.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="preemptwatch", daemon=True)
        self._thread.start()
        if wait > 0:
            self._loop_ready.wait(wait)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the watcher (from any thread); restores signal handlers (which only the
        main thread can do: elsewhere they turn inert, see the signal source)."""
        thread = self._thread
        if thread is not None:
            if thread is threading.current_thread():  # from a callback, say
                if self._loop is not None:
                    self._loop.call_soon(self._loop.stop)
                self._unprepare()
                return
            self._loop_ready.wait(timeout)
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # already closed
                    loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            self._unprepare()
            return
        loop = self._loop
        if loop is None or self._closed:
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
        """Report a notice from any thread, or from a signal handler.

        Takes no lock and does no I/O beyond waking the loop (one byte to its self-pipe,
        as asyncio's own signal handling does), so a signal handler interrupting any
        code, this method included, cannot deadlock.
        """
        if self._closed:
            return
        if not self.preempting and not notice.advisory:
            self._boost()
        self._inbox.append(notice)
        loop = self._loop  # read after the append: see _drain_inbox
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        """Deliver what `notice_threadsafe` queued. A notice appended while ``_loop``
        was still None is drained by `start`, which sets ``_loop`` first and drains
        after; one appended later schedules its own drain."""
        while True:
            try:
                notice = self._inbox.popleft()
            except IndexError:
                return
            self.notice_received(notice)

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
        if notice.kind == "migrate":
            return False
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
        self._boost()
        self.notice = notice
        self.preempting = True
        self._event.set()
        if self._async_event is not None:
            self._async_event.set()
        if self._queue is not None:
            self._queue.put_nowait(notice)
        if self._loop is not None:  # log once the callbacks are on their way
            self._loop.call_soon(log.warning, "preempting: %s", notice)
        else:
            log.warning("preempting: %s", notice)
        self._emit("preempting", notice)

    def _boost(self) -> None:
        """Lower the interpreter's thread switch interval until the notice is handled.

        A training loop running Python code holds the GIL; every other thread waits up
        to the switch interval (5 ms by default) for it, and a notice goes through two
        of them (the watcher's loop, then the callback's thread). At 0.5 ms it reaches
        the first callback a few times sooner. Setting it is a plain store (safe in a
        signal handler); `_unboost`, once the first callback runs, restores it unless
        someone else changed it meanwhile.
        """
        if self._saved_switch is None:
            current = sys.getswitchinterval()
            if current > BOOST_SWITCH_INTERVAL:
                self._saved_switch = current
                sys.setswitchinterval(BOOST_SWITCH_INTERVAL)

    def _unboost(self) -> None:
        """Undo `_boost` (from any thread; a no-op when not boosted)."""
        saved, self._saved_switch = self._saved_switch, None
        if saved is not None and sys.getswitchinterval() == BOOST_SWITCH_INTERVAL:
            sys.setswitchinterval(saved)

    async def _dispatch(self) -> None:
        from .marks import mark_all

        assert self._queue is not None
        while not self._closed:  # not `while True`: see aclose
            notice = await self._queue.get()
            marking = self._spawn(mark_all(notice, self._executor), "mark") if self.mark else None
            for callback in list(self.callbacks):
                await self._call(callback, notice)
            if marking is not None:
                await asyncio.wait({marking}, timeout=_time_left(notice))
            self._unboost()
            self._handled.set()

    async def _call(self, callback: Callback, notice: Notice) -> None:
        """Run one callback, bounded by the time the notice's deadline leaves (at least
        `MIN_CALLBACK_SECONDS`); log, never raise.

        A sync callback runs in a worker thread and cannot be interrupted: once started
        it runs to its end; the bound only says how long the next callback waits for it.
        An async callback is cancelled when its time is up.
        """
        try:
            if inspect.iscoroutinefunction(callback):
                self._unboost()
                awaitable: Awaitable[Any] = callback(notice)
            else:

                def started(notice: Notice) -> Any:
                    self._unboost()  # the callback's thread runs: back to normal switching
                    return callback(notice)

                loop = asyncio.get_running_loop()
                future = loop.run_in_executor(self._executor, started, notice)
                awaitable = asyncio.shield(future)  # a timeout must not stop it starting
            result = await asyncio.wait_for(awaitable, _time_left(notice))
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, _time_left(notice))
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
                try:
                    source = cls(**self._detect_options.get(name, {}))
                except Exception as exc:
                    log.error("cannot start detected source %s: %s", name, exc)
                    return
                self.sources.append(source)
                self._start_source(source)

        try:
            await asyncio.gather(*(probe(n) for n in self._detect))
        finally:
            self._ready.set()

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
        for source in reversed(self.sources):  # undo in reverse: chained handlers unwind
            try:
                source.close()
            except Exception:
                log.exception("source %s could not close cleanly", source.name)
