"""The run store: every state change of a run is one named, atomic SQL transition.

Transitions are conditional updates (``... WHERE incarnation = :inc AND state = 'running'
RETURNING ...``), so they are safe with several replicas on one PostgreSQL database; when a
transition matches nothing, `_refuse` tells why (unknown run, stale incarnation, ended run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import Conflict, NotFound, StaleIncarnation
from .db import Database, retry_transient
from .ids import generate_run_id
from .schema import (
    RUNNING_LITERAL,
    api_keys,
    files,
    history,
    projects,
    run_queue,
    runs,
    sweeps,
)

log = logging.getLogger("preemptwatch.server.store")

RESUME_MODES = ("never", "allow", "must")
DEFAULT_PROJECT = "default"
#: Runs one reaper transaction ends at most.
REAP_BATCH = 1000

Row = Mapping[Any, Any]
RunKey = tuple[int, str, int]  # project_id, run_id, incarnation

_RUNNING = runs.c.state == RUNNING_LITERAL

# The heartbeat batch, as fixed SQL (prepared once, no per-key statement building): the
# batch is joined to runs by primary key, so its cost follows the batch, not the table.
_HEARTBEAT_SQLITE = (
    "UPDATE runs SET heartbeat_at = ? FROM (SELECT json_extract(value, '$[0]') AS p, "
    "json_extract(value, '$[1]') AS r, json_extract(value, '$[2]') AS i FROM json_each(?)) AS b "
    "WHERE runs.project_id = b.p AND runs.id = b.r AND runs.incarnation = b.i "
    "AND runs.state = 'running' "
    "RETURNING runs.project_id, runs.id, runs.incarnation, runs.preempting"
)
_HEARTBEAT_PG = (
    "UPDATE runs SET heartbeat_at = $1 FROM unnest($2::integer[], $3::varchar[], "
    "$4::integer[]) AS b(p, r, i) "
    "WHERE runs.project_id = b.p AND runs.id = b.r AND runs.incarnation = b.i "
    "AND runs.state = 'running' "
    "RETURNING runs.project_id, runs.id, runs.incarnation, runs.preempting"
)


@dataclass(frozen=True)
class Project:
    """A project: the scope of an API key."""

    id: int
    name: str


@dataclass
class ReapResult:
    """What one reaper pass did."""

    preempted: list[tuple[int, str]] = field(default_factory=list)
    crashed: list[tuple[int, str]] = field(default_factory=list)
    queued: list[tuple[int, str, str]] = field(default_factory=list)  # project, sweep, run

    @property
    def reaped(self) -> int:
        """How many runs this pass ended."""
        return len(self.preempted) + len(self.crashed)


def hash_key(key: str) -> str:
    """How an API key is stored: its sha256 (keys are long random strings)."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new API key."""
    return "pw_" + secrets.token_urlsafe(32)


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds as an RFC 3339 UTC string with milliseconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def run_view(row: Row, heartbeat_timeout: float, project_name: str) -> dict[str, Any]:
    """The run object of the HTTP API."""
    return {
        "id": row["id"],
        "project": project_name,
        "state": row["state"],
        "preempting": bool(row["preempting"]),
        "resumed": row["incarnation"] > 1,
        "step": row["step"],
        "incarnation": row["incarnation"],
        "config": row["config"],
        "meta": row["meta"],
        "notice": row["notice"],
        "instance_id": row["instance_id"],
        "host": row["host"],
        "sweep_id": row["sweep_id"],
        "exit_code": row["exit_code"],
        "requeues": row["requeues"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "heartbeat_at": rfc3339(row["heartbeat_at"]),
        "ended_at": rfc3339(row["ended_at"]),
        "heartbeat_timeout": heartbeat_timeout,
    }


class RunStore:
    """Projects, keys, runs, history, file records, the run queue and the reaper's pass."""

    def __init__(
        self,
        db: Database,
        *,
        heartbeat_timeout: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock

    # -- helpers -------------------------------------------------------------------------

    def _insert(self, table: sa.Table) -> Any:
        return (sqlite.insert if self.db.sqlite else postgresql.insert)(table)

    @staticmethod
    def _pk(project_id: int, run_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(runs.c.project_id == project_id, runs.c.id == run_id)

    @staticmethod
    async def _update_run(
        conn: AsyncConnection, *where: sa.ColumnElement[bool], **values: Any
    ) -> Row | None:
        """``UPDATE runs SET values WHERE where``: the updated row, or None if none matched."""
        stmt = sa.update(runs).where(*where).values(**values).returning(*runs.c)
        return (await conn.execute(stmt)).mappings().first()

    @staticmethod
    def _mark(notice: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
        """The columns a preemption mark sets (a mark without a notice keeps the last one)."""
        return {
            "preempting": True,
            "notice": dict(notice) if notice is not None else runs.c.notice,
            "updated_at": now,
        }

    async def _refuse(
        self, conn: AsyncConnection, project_id: int, run_id: str, incarnation: int | None
    ) -> Row:
        """Raise the reason a conditional update on a run matched nothing: unknown run
        (404) or stale incarnation (409). Returns the run row when neither applies."""
        row = (
            (await conn.execute(sa.select(runs).where(self._pk(project_id, run_id))))
            .mappings()
            .first()
        )
        if row is None:
            raise NotFound(f"no run {run_id!r} in this project")
        if incarnation is not None and row["incarnation"] != incarnation:
            raise StaleIncarnation(
                f"incarnation {incarnation} of run {run_id!r} is stale: the run is now at "
                f"incarnation {row['incarnation']}; this process must stop writing to it"
            )
        return row

    @staticmethod
    def _ended(row: Row) -> Conflict:
        return Conflict(
            f"run {row['id']!r} has ended (state {row['state']!r}); resume it to write to it"
        )

    # -- projects and keys ---------------------------------------------------------------

    async def bootstrap(self, conn: AsyncConnection, env_key: str | None) -> str | None:
        """On an empty database create project ``default`` and its first key (``env_key``
        when given). Returns the key when it was generated here, to be printed once."""
        now = self.clock()
        if (await conn.execute(sa.select(projects.c.id).limit(1))).first() is not None:
            if env_key:
                found = await conn.execute(
                    sa.select(api_keys.c.project_id).where(api_keys.c.key_hash == hash_key(env_key))
                )
                if found.first() is None:
                    log.warning("PREEMPTWATCH_API_KEY is not a key of this database")
            return None
        key = env_key or generate_key()
        project_id = (
            await conn.execute(
                sa.insert(projects)
                .values(name=DEFAULT_PROJECT, created_at=now)
                .returning(projects.c.id)
            )
        ).scalar_one()
        await conn.execute(
            sa.insert(api_keys).values(
                key_hash=hash_key(key), project_id=project_id, created_at=now
            )
        )
        return None if env_key else key

    @retry_transient
    async def create_key(self, project: str, key: str | None = None) -> str:
        """Create ``project`` if it does not exist and a new key for it; returns the key."""
        key = key or generate_key()
        now = self.clock()
        async with self.db.write() as conn:
            await conn.execute(
                self._insert(projects)
                .values(name=project, created_at=now)
                .on_conflict_do_nothing(index_elements=[projects.c.name])
            )
            project_id = (
                await conn.execute(sa.select(projects.c.id).where(projects.c.name == project))
            ).scalar_one()
            await conn.execute(
                sa.insert(api_keys).values(
                    key_hash=hash_key(key), project_id=project_id, created_at=now
                )
            )
        return key

    async def project_for_key(self, key: str) -> Project | None:
        """The project an API key belongs to, or None for an unknown key."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(projects.c.id, projects.c.name)
                    .join(api_keys, api_keys.c.project_id == projects.c.id)
                    .where(api_keys.c.key_hash == hash_key(key))
                )
            ).first()
        return Project(row.id, row.name) if row is not None else None

    # -- sweeps and the run queue ----------------------------------------------------------

    @retry_transient
    async def create_sweep(self, project_id: int, sweep_id: str, config: Mapping[str, Any]) -> None:
        """Record a sweep (minimal: the sweeps module builds on this table)."""
        async with self.db.write() as conn:
            await conn.execute(
                sa.insert(sweeps).values(
                    project_id=project_id, id=sweep_id, config=dict(config), created_at=self.clock()
                )
            )

    async def queued_runs(self, project_id: int, sweep_id: str) -> list[str]:
        """Run IDs waiting in a sweep's run queue, oldest first."""
        async with self.db.read() as conn:
            result = await conn.execute(
                sa.select(run_queue.c.run_id)
                .where(run_queue.c.project_id == project_id, run_queue.c.sweep_id == sweep_id)
                .order_by(run_queue.c.id)
            )
            return list(result.scalars())

    async def _enqueue(
        self, conn: AsyncConnection, items: Sequence[tuple[int, str, str]], now: float
    ) -> None:
        """Append runs to their sweeps' queues and count the requeue on each run."""
        if not items:
            return
        await conn.execute(
            sa.insert(run_queue),
            [
                {"project_id": p, "sweep_id": s, "run_id": r, "enqueued_at": now}
                for p, s, r in items
            ],
        )
        await conn.execute(
            sa.update(runs)
            .where(runs.c.project_id == sa.bindparam("b_p"), runs.c.id == sa.bindparam("b_r"))
            .values(requeues=runs.c.requeues + 1),
            [{"b_p": p, "b_r": r} for p, _, r in items],
        )

    # -- runs ----------------------------------------------------------------------------

    @retry_transient
    async def create_or_resume(
        self,
        project_id: int,
        run_id: str | None,
        resume: str,
        *,
        config: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        instance_id: str | None = None,
        host: str | None = None,
        sweep_id: str | None = None,
    ) -> tuple[Row, bool]:
        """Create a run or start a new incarnation of it, per the resume table.

        Returns ``(run, created)``. ``must`` + unknown: 404; ``never`` + known: 409;
        resuming a run whose current incarnation is alive (running, not preempting,
        heartbeat within the timeout): 409.
        """
        if resume not in RESUME_MODES:
            raise ValueError(f"resume must be one of {RESUME_MODES}, not {resume!r}")
        now = self.clock()
        generated = run_id is None
        async with self.db.write() as conn:
            if resume in ("never", "allow"):
                for _ in range(5 if generated else 1):
                    rid = generate_run_id() if generated else run_id
                    row = (
                        (
                            await conn.execute(
                                self._insert(runs)
                                .values(
                                    project_id=project_id,
                                    id=rid,
                                    state="running",
                                    preempting=False,
                                    step=-1,
                                    incarnation=1,
                                    config=dict(config or {}),
                                    meta=dict(meta or {}),
                                    notice=sa.null(),
                                    instance_id=instance_id,
                                    host=host,
                                    sweep_id=sweep_id,
                                    requeues=0,
                                    created_at=now,
                                    updated_at=now,
                                    heartbeat_at=now,
                                )
                                .on_conflict_do_nothing(
                                    index_elements=[runs.c.project_id, runs.c.id]
                                )
                                .returning(*runs.c)
                            )
                        )
                        .mappings()
                        .first()
                    )
                    if row is not None:
                        return row, True
                if resume == "never":
                    raise Conflict(
                        f"run {run_id!r} already exists; pass resume='allow' or 'must' to resume "
                        "it, or choose another ID"
                    )
            if generated:
                raise NotFound("resume='must' needs the ID of an existing run")
            assert run_id is not None
            values: dict[str, Any] = {
                "incarnation": runs.c.incarnation + 1,
                "state": "running",
                "preempting": False,
                "notice": sa.null(),
                "exit_code": None,
                "ended_at": None,
                "heartbeat_at": now,
                "updated_at": now,
                "instance_id": instance_id,
                "host": host,
            }
            if config is not None:
                values["config"] = dict(config)
            if meta is not None:
                values["meta"] = dict(meta)
            if sweep_id is not None:
                values["sweep_id"] = sweep_id
            resumable = sa.or_(
                runs.c.state != RUNNING_LITERAL,
                runs.c.preempting,
                runs.c.heartbeat_at < now - self.heartbeat_timeout,
            )
            resumed = await self._update_run(
                conn, self._pk(project_id, run_id), resumable, **values
            )
            if resumed is not None:
                return resumed, False
            current = await self._refuse(conn, project_id, run_id, None)
            age = now - current["heartbeat_at"]
            raise Conflict(
                f"run {run_id!r} is still running: incarnation {current['incarnation']} sent a "
                f"heartbeat {age:.0f} s ago (timeout {self.heartbeat_timeout:g} s) and is not "
                "marked preempting; stop it, mark it preempting, or wait for the timeout"
            )

    async def get_run(self, project_id: int, run_id: str) -> Row:
        """One run; 404 when unknown."""
        async with self.db.read() as conn:
            return await self._refuse(conn, project_id, run_id, None)

    async def list_runs(
        self,
        project_id: int,
        *,
        state: str | None = None,
        sweep_id: str | None = None,
        instance_id: str | None = None,
        limit: int = 100,
    ) -> list[Row]:
        """Runs of a project, newest first."""
        query = sa.select(runs).where(runs.c.project_id == project_id)
        if state is not None:
            query = query.where(runs.c.state == state)
        if sweep_id is not None:
            query = query.where(runs.c.sweep_id == sweep_id)
        if instance_id is not None:
            query = query.where(runs.c.instance_id == instance_id)
        query = query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit)
        async with self.db.read() as conn:
            return list((await conn.execute(query)).mappings())

    @retry_transient
    async def heartbeat_many(self, keys: Sequence[RunKey]) -> dict[RunKey, tuple[str, bool]]:
        """Record heartbeats of many runs in one statement (the heartbeat batcher calls
        this). Returns ``(state, preempting)`` per key; keys of unknown runs or stale
        incarnations are missing from the answer (see `explain_heartbeat`)."""
        now = self.clock()
        unique = sorted(set(keys))  # one lock order for every replica
        if self.db.sqlite:
            rows = await self.db.write_sql(_HEARTBEAT_SQLITE, (now, json.dumps(unique)))
        else:
            rows = await self.db.write_sql(
                _HEARTBEAT_PG,
                (now, [k[0] for k in unique], [k[1] for k in unique], [k[2] for k in unique]),
            )
        return {(p, r, i): ("running", bool(m)) for p, r, i, m in rows}

    async def explain_heartbeat(self, key: RunKey) -> tuple[str, bool]:
        """For a heartbeat that matched no running run: 404, 409 stale incarnation, or the
        state of the ended run (nothing is changed)."""
        async with self.db.read() as conn:
            row = await self._refuse(conn, key[0], key[1], key[2])
        return row["state"], bool(row["preempting"])

    @retry_transient
    async def log(
        self,
        project_id: int,
        run_id: str,
        incarnation: int,
        data: Mapping[str, Any],
        step: int | None = None,
    ) -> int:
        """Append to the run's history. Without ``step``: last step + 1. A step below the
        last is 409; the same step merges into it. Counts as a heartbeat."""
        now = self.clock()
        cond = [self._pk(project_id, run_id), runs.c.incarnation == incarnation, _RUNNING]
        if step is not None:
            cond.append(runs.c.step <= step)
        async with self.db.write() as conn:
            new_step = (
                await conn.execute(
                    sa.update(runs)
                    .where(*cond)
                    .values(
                        step=runs.c.step + 1 if step is None else step,
                        heartbeat_at=now,
                        updated_at=now,
                    )
                    .returning(runs.c.step)
                )
            ).scalar()
            if new_step is None:
                row = await self._refuse(conn, project_id, run_id, incarnation)
                if row["state"] != "running":
                    raise self._ended(row)
                raise Conflict(
                    f"step {step} is below the run's last step {row['step']}: the step never "
                    "goes backwards (log without a step to append)"
                )
            inserted = (
                await conn.execute(
                    self._insert(history)
                    .values(
                        project_id=project_id,
                        run_id=run_id,
                        step=new_step,
                        incarnation=incarnation,
                        data=dict(data),
                        time=now,
                    )
                    .on_conflict_do_nothing()
                    .returning(history.c.step)
                )
            ).first()
            if inserted is None:
                where = (
                    history.c.project_id == project_id,
                    history.c.run_id == run_id,
                    history.c.step == new_step,
                )
                old = (await conn.execute(sa.select(history.c.data).where(*where))).scalar_one()
                await conn.execute(
                    sa.update(history)
                    .where(*where)
                    .values(data={**old, **data}, incarnation=incarnation, time=now)
                )
            return int(new_step)

    async def history(self, project_id: int, run_id: str) -> list[Row]:
        """The run's logged steps, in order."""
        async with self.db.read() as conn:
            await self._refuse(conn, project_id, run_id, None)
            result = await conn.execute(
                sa.select(history.c.step, history.c.data, history.c.incarnation, history.c.time)
                .where(history.c.project_id == project_id, history.c.run_id == run_id)
                .order_by(history.c.step)
            )
            return list(result.mappings())

    @retry_transient
    async def mark_preempting(
        self, project_id: int, run_id: str, incarnation: int, notice: Mapping[str, Any] | None
    ) -> Row:
        """Flag the running run as preempting (idempotent).

        A mark that arrives late for a run the reaper ended as ``crashed`` (the mark was
        spooled while the server was out of reach) turns it into ``preempted`` and queues
        it in its sweep, as if it had arrived in time: marks are never lost. Other ended
        runs are returned as they are."""
        now = self.clock()
        async with self.db.write() as conn:
            row = await self._update_run(
                conn,
                self._pk(project_id, run_id),
                runs.c.incarnation == incarnation,
                _RUNNING,
                **self._mark(notice, now),
            )
            if row is None:
                row = await self._refuse(conn, project_id, run_id, incarnation)
                if row["state"] == "crashed":
                    row = await self._late_mark(conn, row, notice, now)
            return row

    async def _late_mark(
        self, conn: AsyncConnection, row: Row, notice: Mapping[str, Any] | None, now: float
    ) -> Row:
        """crashed → preempted for a mark of the current incarnation that came late."""
        key = self._pk(row["project_id"], row["id"])
        updated = await self._update_run(
            conn,
            key,
            runs.c.incarnation == row["incarnation"],
            runs.c.state == "crashed",
            state="preempted",
            **self._mark(notice, now),
        )
        if updated is None:
            return row
        sweep = updated["sweep_id"]
        if sweep is not None:
            pair = (updated["project_id"], sweep)
            if pair not in await self._requeue_crashed_sweeps(conn, [pair]):  # not queued yet
                await self._enqueue(conn, [(pair[0], sweep, updated["id"])], now)
                return {**updated, "requeues": updated["requeues"] + 1}
        return updated

    @retry_transient
    async def finish(self, project_id: int, run_id: str, incarnation: int, exit_code: int) -> Row:
        """End the run per the exit-status table: 0 → finished; non-zero and marked
        preempting → preempted (queued in its sweep); otherwise failed. Ended runs: 409."""
        now = self.clock()
        if exit_code == 0:
            state: Any = "finished"
        else:
            state = sa.case((runs.c.preempting, "preempted"), else_="failed")
        async with self.db.write() as conn:
            row = await self._update_run(
                conn,
                self._pk(project_id, run_id),
                runs.c.incarnation == incarnation,
                _RUNNING,
                state=state,
                exit_code=exit_code,
                ended_at=now,
                updated_at=now,
            )
            if row is None:
                raise self._ended(await self._refuse(conn, project_id, run_id, incarnation))
            if row["state"] == "preempted" and row["sweep_id"] is not None:
                await self._enqueue(conn, [(project_id, row["sweep_id"], run_id)], now)
                row = {**row, "requeues": row["requeues"] + 1}
            return row

    @retry_transient
    async def mark_instance(
        self, project_id: int, instance_id: str, notice: Mapping[str, Any] | None
    ) -> list[str]:
        """Mark every running run of the instance preempting; returns their IDs."""
        now = self.clock()
        async with self.db.write() as conn:
            result = await conn.execute(
                sa.update(runs)
                .where(runs.c.project_id == project_id, runs.c.instance_id == instance_id, _RUNNING)
                .values(**self._mark(notice, now))
                .returning(runs.c.id)
            )
            return sorted(result.scalars())

    # -- files ---------------------------------------------------------------------------

    async def check_writer(self, project_id: int, run_id: str, incarnation: int) -> None:
        """Refuse early (before any byte is stored) a file upload that would be refused."""
        async with self.db.read() as conn:
            await self._refuse(conn, project_id, run_id, incarnation)

    @retry_transient
    async def record_file(
        self,
        project_id: int,
        run_id: str,
        incarnation: int,
        name: str,
        *,
        size: int,
        sha256: str,
        storage_key: str,
    ) -> str | None:
        """Point the file ``name`` at newly stored bytes, if ``incarnation`` is current.
        Returns the storage key of the bytes it replaced (to delete), if any."""
        now = self.clock()
        async with self.db.write() as conn:
            ok = (
                await conn.execute(
                    sa.update(runs)
                    .where(self._pk(project_id, run_id), runs.c.incarnation == incarnation)
                    .values(updated_at=now)
                    .returning(runs.c.id)
                )
            ).first()
            if ok is None:
                await self._refuse(conn, project_id, run_id, incarnation)
            where = (
                files.c.project_id == project_id,
                files.c.run_id == run_id,
                files.c.name == name,
            )
            old = (await conn.execute(sa.select(files.c.storage_key).where(*where))).scalar()
            values = {
                "size": size,
                "sha256": sha256,
                "storage_key": storage_key,
                "incarnation": incarnation,
                "updated_at": now,
            }
            if old is None:
                await conn.execute(
                    sa.insert(files).values(
                        project_id=project_id, run_id=run_id, name=name, **values
                    )
                )
            else:
                await conn.execute(sa.update(files).where(*where).values(**values))
            return old

    async def list_files(self, project_id: int, run_id: str) -> list[Row]:
        """The run's files, by name."""
        async with self.db.read() as conn:
            await self._refuse(conn, project_id, run_id, None)
            result = await conn.execute(
                sa.select(files)
                .where(files.c.project_id == project_id, files.c.run_id == run_id)
                .order_by(files.c.name)
            )
            return list(result.mappings())

    async def get_file(self, project_id: int, run_id: str, name: str) -> Row:
        """One file record; 404 for an unknown run or file."""
        async with self.db.read() as conn:
            await self._refuse(conn, project_id, run_id, None)
            row = (
                (
                    await conn.execute(
                        sa.select(files).where(
                            files.c.project_id == project_id,
                            files.c.run_id == run_id,
                            files.c.name == name,
                        )
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"run {run_id!r} has no file {name!r}")
        return row

    # -- the reaper ----------------------------------------------------------------------

    async def reap(self, now: float | None = None, *, batch: int = REAP_BATCH) -> ReapResult:
        """One reaper pass: running runs without a heartbeat for the timeout become
        ``preempted`` (marked) or ``crashed``; preempted runs of a sweep, and crashed ones
        whose sweep config says ``requeue_crashed: true``, join the sweep's run queue.

        Each batch is one transaction of a few set-based statements. Rows are claimed with
        ``FOR UPDATE SKIP LOCKED`` and the update is conditional on ``state = 'running'``,
        so with several replicas each stale run is reaped and queued exactly once.
        """
        now = self.clock() if now is None else now
        total = ReapResult()
        while True:
            ended, queue = await self._reap_batch(now, batch)
            for p, r, st, _ in ended:
                (total.preempted if st == "preempted" else total.crashed).append((p, r))
            total.queued += queue
            if len(ended) < batch:
                return total

    @retry_transient
    async def _reap_batch(
        self, now: float, batch: int
    ) -> tuple[list[tuple[int, str, str, str | None]], list[tuple[int, str, str]]]:
        """End up to ``batch`` stale runs and queue those that should be; one transaction."""
        claimed = (
            sa.select(runs.c.project_id, runs.c.id)
            .where(_RUNNING, runs.c.heartbeat_at < now - self.heartbeat_timeout)
            .order_by(runs.c.heartbeat_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
            .subquery("claimed")
        )
        async with self.db.write() as conn:
            # UPDATE ... FROM (claimed): both engines then find each claimed row by key
            result = await conn.execute(
                sa.update(runs)
                .where(
                    runs.c.project_id == claimed.c.project_id,
                    runs.c.id == claimed.c.id,
                    _RUNNING,
                )
                .values(
                    state=sa.case((runs.c.preempting, "preempted"), else_="crashed"),
                    ended_at=now,
                    updated_at=now,
                )
                .returning(runs.c.project_id, runs.c.id, runs.c.state, runs.c.sweep_id)
            )
            ended = [(p, r, st, s) for p, r, st, s in result]
            queue = [(p, s, r) for p, r, st, s in ended if st == "preempted" and s is not None]
            crashed_sweeps = {(p, s) for p, _, st, s in ended if st == "crashed" and s}
            if crashed_sweeps:
                requeue = await self._requeue_crashed_sweeps(conn, crashed_sweeps)
                queue += [
                    (p, s, r)
                    for p, r, st, s in ended
                    if st == "crashed" and s is not None and (p, s) in requeue
                ]
            await self._enqueue(conn, queue, now)
        return ended, queue

    async def _requeue_crashed_sweeps(
        self, conn: AsyncConnection, keys: Iterable[tuple[int, str]]
    ) -> set[tuple[int, str]]:
        """Which of these sweeps ask for crashed runs to be requeued."""
        result = await conn.execute(
            sa.select(sweeps.c.project_id, sweeps.c.id, sweeps.c.config).where(
                sa.tuple_(sweeps.c.project_id, sweeps.c.id).in_(list(keys))
            )
        )
        return {
            (p, s)
            for p, s, config in result
            if isinstance(config, dict) and config.get("requeue_crashed") is True
        }
