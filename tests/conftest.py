"""Fixtures shared by every test area.

Each area keeps its own fixtures in ``tests/<area>/conftest.py``; what several areas need
(free ports, a fresh PostgreSQL database, database URLs for both engines) lives here.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from preemptwatch.server.testing import InProcessServer, ServerProcess
from preemptwatch.server.testing import free_port as free_port  # re-exported for the areas

PG_HOST = os.environ.get("PREEMPTWATCH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = os.environ.get("PREEMPTWATCH_TEST_PG_PORT", "5432")
PG_USER = os.environ.get("PREEMPTWATCH_TEST_PG_USER", "postgres")


def _psql(sql: str) -> None:
    subprocess.run(
        [
            "psql",
            "-h",
            PG_HOST,
            "-p",
            PG_PORT,
            "-U",
            PG_USER,
            "-d",
            "test",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            sql,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def pg_database() -> Iterator[str]:
    """Create a fresh, empty PostgreSQL database; yield its URL; drop it afterwards."""
    name = f"pw_{uuid.uuid4().hex[:12]}"
    _psql(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for one test."""
    yield from pg_database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL, once for the embedded SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'preemptwatch.db'}"
    else:
        yield from pg_database()


@pytest.fixture
def server_process(db_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ``preemptwatch server`` process on a fresh database of each engine (like
    ``db_url``), API key from ``PREEMPTWATCH_API_KEY``. Yields a
    `preemptwatch.server.testing.ServerProcess`: ``url``, ``api_key``, ``db_url``,
    ``headers()``, ``stop()``, ``kill()``, ``start()``."""
    proc = ServerProcess(db_url, workdir=tmp_path / "server")
    with proc:
        yield proc


@pytest.fixture
async def server_inprocess(db_url: str, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """The server app in the test's event loop on a free port (fast; same HTTP API), on a
    fresh database of each engine. Yields a `preemptwatch.server.testing.InProcessServer`:
    ``url``, ``api_key``, ``headers()``, ``ctx`` (store, config) and ``await reap(now)``
    (its reaper does not run by itself)."""
    async with InProcessServer(db_url, str(tmp_path / "server-files")) as server:
        yield server
