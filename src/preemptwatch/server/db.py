"""Engines for both databases, transactions, and migrations applied at start.

SQLite runs in WAL mode; the driver's own transaction handling is turned off so that every
write transaction starts with ``BEGIN IMMEDIATE`` (it takes the write lock up front and
waits ``busy_timeout`` for it, instead of failing on a lock upgrade).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlalchemy as sa
import tenacity
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .config import async_db_url, is_sqlite

log = logging.getLogger("preemptwatch.server.db")

MIGRATIONS = Path(__file__).parent / "migrations"
#: Advisory-lock key that serialises migrations of replicas starting together.
MIGRATION_LOCK_KEY = 0x70726565  # "pree"

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Database:
    """An async engine plus the transaction helpers the store uses."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.sqlite = is_sqlite(url)
        if self.sqlite:
            path = url.split(":///", 1)[1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                async_db_url(url), pool_size=4, max_overflow=4
            )
            sa.event.listen(self.engine.sync_engine, "connect", _sqlite_on_connect)
            # Hot writes (heartbeat batches) run whole transactions in one worker thread on
            # a plain sqlite3 connection: one thread hop per transaction, little Python.
            self._sqlite_path = path
            self._raw: sqlite3.Connection | None = None
            self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
                1, thread_name_prefix="sqlite-writer"
            )
        else:
            self.engine = create_async_engine(
                async_db_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
            self._raw = None
            self._executor = None
        self._pg_raw: Any = None  # asyncpg connection of the hot path
        self._pg_lock = asyncio.Lock()
        # SQLite has one writer at a time: queue writers of this process here rather than
        # in the busy handler.
        self._write_lock = asyncio.Lock() if self.sqlite else None

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "sqlite" if self.sqlite else "postgresql"

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block ends without an error."""
        if self._write_lock is not None:
            async with self._write_lock, self.engine.connect() as conn:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    await conn.rollback()
                    raise
                await conn.commit()
        else:
            async with self.engine.begin() as conn:
                yield conn

    async def write_sql(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Run one statement in its own transaction on the hot-path connection and return
        its rows. SQLite: in the writer thread (one hop, almost no Python holding the GIL
        there); PostgreSQL: on a dedicated asyncpg connection (one round trip) with
        ``synchronous_commit`` off, so only for writes whose loss in a crash is harmless
        (heartbeats). ``sql`` uses the driver's placeholders (``?`` or ``$1``)."""
        if not self.sqlite:
            async with self._pg_lock:
                if self._pg_raw is None or self._pg_raw.is_closed():
                    import asyncpg

                    dsn = sa.make_url(self.url).set(drivername="postgresql")
                    self._pg_raw = await asyncpg.connect(
                        dsn.render_as_string(hide_password=False),
                        server_settings={"synchronous_commit": "off"},
                    )
                try:
                    return list(await self._pg_raw.fetch(sql, *params))
                except (OSError, ConnectionError):
                    await self._pg_raw.close()
                    raise
        assert self._executor is not None and self._write_lock is not None
        async with self._write_lock:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._raw_write, sql, params)

    def _raw_write(self, sql: str, params: Sequence[Any]) -> list[Any]:
        if self._raw is None:
            self._raw = sqlite3.connect(self._sqlite_path, check_same_thread=False)
            _sqlite_on_connect(self._raw, None)
        raw = self._raw
        raw.execute("BEGIN IMMEDIATE")
        try:
            rows = raw.execute(sql, params).fetchall()
        except BaseException:
            raw.rollback()
            raise
        raw.commit()
        return rows

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (one consistent snapshot per statement at least)."""
        async with self.engine.connect() as conn:
            yield conn

    async def migrate(
        self, then: Callable[[AsyncConnection], Awaitable[T]] | None = None
    ) -> T | None:
        """Apply every Alembic migration not yet applied, then ``then(conn)`` in the same
        transaction. Replicas on one PostgreSQL database take an advisory lock, so only
        one migrates (and bootstraps) and the others wait."""
        result: T | None = None
        async with self.engine.connect() as conn:
            if self.sqlite:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                await conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY}
                )
            await conn.run_sync(_upgrade)
            if then is not None:
                result = await then(conn)
            await conn.commit()
        return result

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        if self._pg_raw is not None:
            await self._pg_raw.close()
            self._pg_raw = None
        if self._executor is not None:
            if self._raw is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._raw.close)
                self._raw = None
            self._executor.shutdown(wait=False)


def _upgrade(sync_conn: sa.Connection) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",  # durable across process crashes in WAL mode
        "PRAGMA busy_timeout=10000",
        "PRAGMA foreign_keys=ON",
    ):
        cursor.execute(pragma)
    cursor.close()


#: PostgreSQL error codes of transactions that were rolled back and may simply be retried.
_RETRY_SQLSTATES = {"40001", "40P01"}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a database error that rolled the transaction back and is worth a
    retry: a deadlock or serialization failure on PostgreSQL, a lock timeout on SQLite."""
    if isinstance(exc, sqlite3.OperationalError):
        return "database is locked" in str(exc)
    if getattr(exc, "sqlstate", None) in _RETRY_SQLSTATES:  # asyncpg, used directly
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in _RETRY_SQLSTATES:
        return True
    return "database is locked" in str(orig)


def retry_transient(fn: F) -> F:
    """Retry a store transition on transient database errors (jittered backoff, 5 tries)."""
    return cast(
        F,
        tenacity.retry(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_random_exponential(multiplier=0.02, max=1.0),
            stop=tenacity.stop_after_attempt(5),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "%s: transient database error, retrying: %s",
                fn.__name__,
                state.outcome.exception() if state.outcome else "?",
            ),
        )(fn),
    )
