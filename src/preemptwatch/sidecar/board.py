"""The notice board: what the sidecar knows, and the long-poll waits on it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..notice import Notice


class NoticeBoard:
    """The notices seen so far, with a version that grows on every change.

    Fed by a `Watcher` listener (``board.listener``) on the watcher's loop and read by
    the HTTP handlers on the same loop. Waiters wake on the change itself (an event set
    synchronously by the listener), so a long-poll answers in the same loop iteration
    as the detection.
    """

    def __init__(self) -> None:
        self.version = 0
        self.notices: dict[tuple[str, str], Notice] = {}
        #: The first notice that counted, or None.
        self.notice: Notice | None = None
        #: Monotonic time at which that notice reached the board.
        self.preempting_at: float | None = None
        self._changed: asyncio.Event | None = None
        self._closed = False

    @property
    def preempting(self) -> bool:
        """Whether a notice that counts has arrived."""
        return self.notice is not None

    def listener(self, event: str, data: Any) -> None:
        """`Watcher.add_listener` hook."""
        if event == "notice":
            self.notices[data.key] = data
        elif event == "clear":
            if self.notices.pop(tuple(data), None) is None:
                return
        elif event == "preempting":
            if self.notice is not None:
                return
            self.notice = data
            self.preempting_at = time.monotonic()
        else:
            return
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def close(self) -> None:
        """Answer every waiting long-poll now (the sidecar is stopping)."""
        self._closed = True
        if self._changed is not None:
            self._changed.set()

    def snapshot(self) -> dict[str, Any]:
        """The JSON body of ``GET /v1/notice``."""
        return {
            "preempting": self.preempting,
            "notice": self.notice.to_dict() if self.notice else None,
            "notices": [n.to_dict() for n in self.notices.values()],
            "version": self.version,
        }

    async def wait(self, timeout: float, after: int | None = None) -> None:
        """Return once preempting (``after`` is None) or once the version differs from
        ``after`` (a change, or a restarted sidecar); at the latest after ``timeout``
        seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while not (self.preempting if after is None else self.version != after):
            if self._closed:
                return
            left = until - loop.time()
            if left <= 0:
                return
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return
