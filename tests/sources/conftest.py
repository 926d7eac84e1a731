"""Fixtures of the source tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest


@pytest.fixture
def no_crash(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever the metadata service does, the source never crashes into the watcher."""
    yield
    crashed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashed, [r.getMessage() for r in crashed]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
