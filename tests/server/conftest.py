"""Fixtures of the server's tests: an in-process server over real HTTP with a clock the
test moves, and a small JSON client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from preemptwatch.server.testing import InProcessServer, ManualClock

TIMEOUT = 60.0


class Api:
    """A JSON client of one server and key: ``status, body = await api.post(path, json)``."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str | None) -> None:
        self.session = session
        self.url = url
        self.key = key

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        **kw: Any,
    ) -> tuple[int, Any]:
        """One request; the key's Authorization header unless ``headers`` names another."""
        async with self.session.request(
            method,
            self.url + path,
            json=json,
            data=data,
            headers={**self._headers(), **(headers or {})},
            **kw,
        ) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.read()

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> tuple[int, Any]:
        return await self.request("POST", path, json=json, **kw)

    async def create(self, run_id: str | None = None, resume: str = "never", **fields: Any) -> Any:
        body = {"resume": resume, **fields}
        if run_id is not None:
            body["id"] = run_id
        status, run = await self.post("/api/v1/runs", body)
        assert status in (200, 201), run
        return run

    async def run(self, run_id: str) -> Any:
        status, run = await self.get(f"/api/v1/runs/{run_id}")
        assert status == 200, run
        return run

    def as_key(self, key: str | None) -> Api:
        """The same server with another key (or none)."""
        return Api(self.session, self.url, key)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000.0)


@pytest.fixture
async def app_server(
    db_url: str, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[InProcessServer]:
    """The server in this loop on a free port: heartbeat timeout 60 s, the test's clock."""
    async with InProcessServer(
        db_url, str(tmp_path / "files"), clock=clock, heartbeat_timeout=TIMEOUT, max_file_size=4096
    ) as server:
        yield server


@pytest.fixture
async def api(app_server: InProcessServer) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield Api(session, app_server.url, app_server.api_key)
