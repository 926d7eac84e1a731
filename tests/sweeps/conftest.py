"""Fixtures of the sweep tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sweep_helpers import ServerThread, start_server_thread


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[ServerThread]:
    """The server in-process on SQLite and on PostgreSQL, heartbeat timeout 60 s."""
    srv = start_server_thread(db_url, tmp_path)
    try:
        yield srv
    finally:
        srv.thread.stop()
