"""Helpers of the source tests: a simulator served from its own thread, waiting for a
condition, and a simulator run by the CLI in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from preemptwatch.simulate import Simulator, SimulatorThread

S = TypeVar("S", bound=Simulator)


class Sim(Generic[S]):
    """A simulator served from its own thread, with shortcuts for the tests."""

    def __init__(self, sim: S) -> None:
        self.sim = sim
        self.thread = SimulatorThread(sim)
        self.url = self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the simulator's loop."""
        return self.thread.call(lambda: fn(*args, **kwargs))


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` is true, failing after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def simulator_cli(provider: str, *args: str, port: int = 0) -> Iterator[str]:
    """``preemptwatch simulate PROVIDER --port PORT ARGS`` in a subprocess, stopped on
    exit; yields the root URL it prints when it is serving."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "preemptwatch", "simulate", provider, "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"http://[\d.]+:\d+", line)
        assert found, f"no address in {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        yield found.group(0)
    finally:
        proc.terminate()
        proc.wait(10)
