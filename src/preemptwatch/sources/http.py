"""HTTP pieces the metadata sources share: bounded bodies, aiohttp errors turned into
`SourceError`, quiet probes, and running watch loops side by side."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable, Iterator
from typing import TypeVar

import aiohttp

from .base import SourceError

T = TypeVar("T")


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ``SourceError`` when it is larger than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(8192):
        size += len(chunk)
        if size > limit:
            raise SourceError(f"{resp.url}: answer larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def http_errors(
    where: str,
    timeout: float | None = None,
    *,
    timed_out: str | None = None,
    name: bool = True,
) -> Iterator[None]:
    """Turn a timeout or an aiohttp error inside the block into `SourceError`.

    A timeout says ``timed_out``, else ``"<where>: no answer within <timeout>s"``; any
    other error says ``"<where>: <ErrorType>: <error>"`` (no type when ``name`` is false).
    """
    try:
        yield
    except asyncio.TimeoutError:
        if timed_out is None:
            within = f" within {timeout:.1f}s" if timeout is not None else ""
            timed_out = f"{where}: no answer{within}"
        raise SourceError(timed_out) from None
    except aiohttp.ClientError as exc:
        detail = f"{type(exc).__name__}: {exc}" if name else str(exc)
        raise SourceError(f"{where}: {detail}") from exc


async def quietly(probe: Awaitable[T]) -> T | None:
    """``await probe``, or None when it raises (for ``detect`` and ``fetch_instance_id``,
    which must never raise)."""
    try:
        return await probe
    except Exception:
        return None


async def run_together(coros: Iterable[Awaitable[None]]) -> None:
    """Run coroutines side by side; the first error cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
