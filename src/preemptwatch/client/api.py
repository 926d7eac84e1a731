"""`ApiClient`: one synchronous method per endpoint of the server's HTTP API.

Every call goes through aiohttp on the client's own loop (see `loop`), with a timeout per
attempt. Connection errors, timeouts and 5xx answers are retried with jittered exponential
backoff (tenacity) for up to ``retry_budget`` seconds, then raise `ApiUnavailable`; 4xx
answers are final and raise the matching `ApiError` subclass with the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import os
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_random_exponential

from ..errors import ApiError, ApiUnavailable, api_error
from ..notice import Notice
from .loop import client_loop, in_client_loop, run_sync
from .settings import DEFAULT_SERVER, normalize_run_id, normalize_server

_CHUNK = 1 << 20


class _Transient(Exception):
    """A 5xx (or 408/429) answer: worth another try."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


_closing: set[asyncio.Future[None]] = set()


def _close_later(session: aiohttp.ClientSession) -> None:
    """Close the session of a client that was dropped without ``close()``, or that is
    still open when the interpreter exits (on the client loop)."""
    if session.closed:
        return
    with contextlib.suppress(Exception):
        if in_client_loop():
            task = asyncio.ensure_future(session.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)
        else:
            asyncio.run_coroutine_threadsafe(session.close(), client_loop()).result(1.0)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (_Transient, aiohttp.ClientConnectionError, asyncio.TimeoutError))


def notice_body(notice: Notice | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON form of a notice for the API (a `Notice` or an already JSON-able dict)."""
    if notice is None:
        return None
    if isinstance(notice, Notice):
        return notice.to_dict()
    return dict(notice)


def _q(value: str) -> str:
    return quote(str(value), safe="")


def _qname(name: str) -> str:
    """A file name in a URL path: its ``/``-separated parts quoted one by one."""
    return quote(name, safe="/")


class ApiClient:
    """Client of one server with one API key. Thread-safe; methods block the caller only.

    ``timeout`` bounds each attempt; ``retry_budget`` bounds the retries of one call.
    """

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry_budget: float = 30.0,
    ) -> None:
        self.server = normalize_server(
            server or os.environ.get("PREEMPTWATCH_SERVER") or DEFAULT_SERVER
        )
        self.api_key = api_key or os.environ.get("PREEMPTWATCH_API_KEY") or None
        if timeout <= 0 or retry_budget < 0:
            raise ValueError("timeout must be positive and retry_budget not negative")
        self.timeout = timeout
        self.retry_budget = retry_budget
        self._session: aiohttp.ClientSession | None = None
        self._session_pid: int | None = None

    def __repr__(self) -> str:
        return f"ApiClient({self.server!r})"

    # ---------------------------------------------------------------- plumbing

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed or self._session_pid != os.getpid():
            headers = {"User-Agent": "preemptwatch-client"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._session = aiohttp.ClientSession(headers=headers, trust_env=True)
            self._session_pid = os.getpid()
            # A client dropped without close() still closes its session.
            weakref.finalize(self, _close_later, self._session)
        return self._session

    async def arequest(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        upload: Path | None = None,
        download: Path | None = None,
        budget: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one API request (on the client loop) and return its decoded JSON answer.

        ``upload`` streams a file as the body; ``download`` streams the answer into a
        file (written to a temporary name, then renamed) and returns its path.
        """
        budget = self.retry_budget if budget is None else budget
        per_try = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        url = f"{self.server}{path}"
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_random_exponential(multiplier=0.25, max=5.0),
            stop=stop_after_delay(budget),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    left = max(0.5, min(per_try, deadline - time.monotonic()))
                    return await self._attempt(method, url, query, json, upload, download, left)
        except _Transient as exc:
            raise ApiUnavailable(
                f"{method} {url} kept failing: {exc.message}", status=exc.status
            ) from None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ApiUnavailable(f"cannot reach the server at {self.server}: {reason}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self,
        method: str,
        url: str,
        query: dict[str, str],
        json: Any,
        upload: Path | None,
        download: Path | None,
        timeout: float,
    ) -> Any:
        session = await self._get_session()
        streaming = upload is not None or download is not None
        client_timeout = (
            aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
            if streaming
            else aiohttp.ClientTimeout(total=timeout)
        )
        with contextlib.ExitStack() as stack:
            kwargs: dict[str, Any] = {"params": query, "timeout": client_timeout}
            if json is not None:
                kwargs["json"] = json
            if upload is not None:
                kwargs["data"] = stack.enter_context(open(upload, "rb"))
                kwargs["headers"] = {"Content-Type": "application/octet-stream"}
            async with session.request(method, url, **kwargs) as resp:
                if resp.status >= 400:
                    await self._raise_for(resp)
                if download is not None:
                    return await self._save(resp, download)
                if resp.status == 204:
                    return None
                text = await resp.text()
                return jsonlib.loads(text) if text else None

    @staticmethod
    async def _raise_for(resp: aiohttp.ClientResponse) -> None:
        text = await resp.text()
        code: str | None = None
        message = text[:500] or resp.reason or "no message"
        with contextlib.suppress(ValueError, AttributeError):
            body = jsonlib.loads(text)
            code = body.get("error")
            message = body.get("message") or message
        if resp.status >= 500 or resp.status in (408, 429):
            raise _Transient(resp.status, message)
        raise api_error(resp.status, code, message)

    @staticmethod
    async def _save(resp: aiohttp.ClientResponse, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with open(tmp, "wb") as out:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    out.write(chunk)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return dest

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Synchronous `arequest` (for endpoints without a method of their own)."""
        return run_sync(self.arequest(method, path, **kwargs))

    def close(self) -> None:
        """Close the HTTP session (the client can still be used: it opens a new one)."""
        session, self._session = self._session, None
        if session is not None and not session.closed and self._session_pid == os.getpid():

            async def close() -> None:
                await session.close()

            with contextlib.suppress(Exception):
                run_sync(close(), timeout=5)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- runs

    def create_run(
        self,
        *,
        id: str | None = None,
        resume: str = "never",
        config: Mapping[str, Any] | None = None,
        instance_id: str | None = None,
        host: str | None = None,
        sweep_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /runs``: create or resume a run; returns the run (``resumed`` tells which)."""
        body: dict[str, Any] = {"resume": resume}
        if id is not None:
            body["id"] = normalize_run_id(id)
        for key, value in (
            ("config", dict(config) if config is not None else None),
            ("instance_id", instance_id),
            ("host", host),
            ("sweep_id", sweep_id),
            ("meta", dict(meta) if meta is not None else None),
        ):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = self.request("POST", "/api/v1/runs", json=body)
        return result

    def list_runs(
        self,
        *,
        state: str | None = None,
        sweep_id: str | None = None,
        instance_id: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """``GET /runs``: runs of this project, newest first."""
        params = {"state": state, "sweep_id": sweep_id, "instance_id": instance_id, "limit": limit}
        runs: list[dict[str, Any]] = self.request("GET", "/api/v1/runs", params=params)["runs"]
        return runs

    def get_run(self, run_id: str) -> dict[str, Any]:
        """``GET /runs/{id}``."""
        run: dict[str, Any] = self.request("GET", f"/api/v1/runs/{_q(run_id)}")
        return run

    def heartbeat(self, run_id: str, incarnation: int) -> dict[str, Any]:
        """``POST /runs/{id}/heartbeat``: ``{"state", "preempting"}``."""
        body = {"incarnation": incarnation}
        answer: dict[str, Any] = self.request(
            "POST", f"/api/v1/runs/{_q(run_id)}/heartbeat", json=body
        )
        return answer

    def log(
        self, run_id: str, incarnation: int, data: Mapping[str, Any], step: int | None = None
    ) -> int:
        """``POST /runs/{id}/log``; returns the step the data was logged at."""
        body: dict[str, Any] = {"incarnation": incarnation, "data": dict(data)}
        if step is not None:
            body["step"] = step
        return int(self.request("POST", f"/api/v1/runs/{_q(run_id)}/log", json=body)["step"])

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """``GET /runs/{id}/history``: logged steps in order."""
        rows: list[dict[str, Any]] = self.request("GET", f"/api/v1/runs/{_q(run_id)}/history")[
            "history"
        ]
        return rows

    def mark_preempting(
        self,
        run_id: str,
        incarnation: int,
        notice: Notice | Mapping[str, Any] | None = None,
        *,
        budget: float | None = None,
    ) -> dict[str, Any]:
        """``POST /runs/{id}/preempting`` (idempotent); returns the run."""
        body: dict[str, Any] = {"incarnation": incarnation}
        if notice is not None:
            body["notice"] = notice_body(notice)
        run: dict[str, Any] = self.request(
            "POST",
            f"/api/v1/runs/{_q(run_id)}/preempting",
            json=body,
            budget=budget,
            timeout=min(self.timeout, budget) if budget else None,
        )
        return run

    def finish(
        self, run_id: str, incarnation: int, exit_code: int, *, budget: float | None = None
    ) -> dict[str, Any]:
        """``POST /runs/{id}/finish``; returns the ended run."""
        body = {"incarnation": incarnation, "exit_code": exit_code}
        run: dict[str, Any] = self.request(
            "POST", f"/api/v1/runs/{_q(run_id)}/finish", json=body, budget=budget
        )
        return run

    # ------------------------------------------------------------------ files

    def upload_file(
        self, run_id: str, incarnation: int, path: str | os.PathLike[str], name: str | None = None
    ) -> dict[str, Any]:
        """``PUT /runs/{id}/files/{name}``, streaming the file; ``{"name", "size", "sha256"}``."""
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no such file to upload: {source}")
        name = name or source.name
        answer: dict[str, Any] = self.request(
            "PUT",
            f"/api/v1/runs/{_q(run_id)}/files/{_qname(name)}",
            params={"incarnation": incarnation},
            upload=source,
            budget=max(self.retry_budget, 60.0),
        )
        return answer

    def list_files(self, run_id: str) -> list[dict[str, Any]]:
        """``GET /runs/{id}/files``."""
        files: list[dict[str, Any]] = self.request("GET", f"/api/v1/runs/{_q(run_id)}/files")[
            "files"
        ]
        return files

    def download_file(self, run_id: str, name: str, dest: str | os.PathLike[str]) -> Path:
        """``GET /runs/{id}/files/{name}``, streamed into ``dest``; returns ``dest``."""
        path: Path = self.request(
            "GET",
            f"/api/v1/runs/{_q(run_id)}/files/{_qname(name)}",
            download=Path(dest),
            budget=max(self.retry_budget, 60.0),
        )
        return path

    # -------------------------------------------------------------- instances

    def mark_instance_preempting(
        self,
        instance_id: str,
        notice: Notice | Mapping[str, Any] | None = None,
        *,
        budget: float | None = None,
    ) -> list[str]:
        """``POST /instances/{id}/preempting``: the IDs of the runs it marked."""
        body: dict[str, Any] = {}
        if notice is not None:
            body["notice"] = notice_body(notice)
        answer = self.request(
            "POST", f"/api/v1/instances/{_q(instance_id)}/preempting", json=body, budget=budget
        )
        return list(answer["marked"])

    def healthy(self, timeout: float = 2.0) -> bool:
        """Whether ``/healthz`` answers 2xx right now (one attempt, no retries)."""
        try:
            self.request("GET", "/healthz", budget=0, timeout=timeout)
        except (ApiError, ValueError):
            return False
        return True
