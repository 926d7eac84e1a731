"""The sweep store: each state change of sweeps, agents and their runs as named SQL statements.

A claim is atomic with any number of agents and server replicas: a queued run is taken with
``SELECT ... FOR UPDATE SKIP LOCKED`` then a conditional ``UPDATE ... WHERE claimed_by IS
NULL`` (SQLite serialises writers with ``BEGIN IMMEDIATE``, so the conditional update alone
decides there); a new parameter set takes the next number from a counter on the sweep row
(``UPDATE sweeps SET suggested = suggested + 1 ... RETURNING``), so every suggestion number is
handed out once. The search methods themselves are stateless (`preemptwatch.sweeps.search`).

Agents heartbeat; an agent silent for the heartbeat timeout is declared gone and its claims
are released: a queued run goes back to the queue, a new run that never started is queued.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import BadRequest, Conflict, NotFound
from ..sweeps.config import SweepConfig, SweepConfigError, parse_config
from ..sweeps.search import GridSearch, SearchMethod, Trial, make_search
from . import schema
from .db import Database
from .ids import generate_run_id
from .schema import history, runs
from .store import rfc3339

#: Sweep states. ``finished``: nothing left to search, queued or running.
SWEEP_STATES = ("running", "paused", "finished", "cancelled")
#: action -> (states it applies to, resulting state).
TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": (("running",), "paused"),
    "resume": (("paused",), "running"),
    "cancel": (("running", "paused"), "cancelled"),
}

# The sweep tables, by the names this module uses.
sweeps_t, queue_t = schema.sweeps, schema.run_queue
agents_t, sweep_runs_t = schema.sweep_agents, schema.sweep_runs


def _sweep_key(project_id: int, sweep_id: str) -> Any:
    return sa.and_(sweeps_t.c.project_id == project_id, sweeps_t.c.id == sweep_id)


class SweepStore:
    """Sweeps, their run queue and agents on one database.

    ``heartbeat_timeout`` is how long an agent may stay silent before its claims are
    released; ``clock`` gives Unix seconds (tests pass a controlled one).
    """

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
        self._configs: dict[tuple[int, str], SweepConfig] = {}
        self._searches: dict[tuple[int, str], SearchMethod] = {}
        #: When this process last looked for silent agents, per sweep (claims do it at
        #: most once a second, inside their own transaction).
        self._maintained: dict[tuple[int, str], float] = {}

    # ------------------------------------------------------------------ sweeps

    async def create(self, project_id: int, raw_config: Any) -> dict[str, Any]:
        """Validate a sweep config (W&B format) and store a new running sweep."""
        try:
            parse_config(raw_config)
        except SweepConfigError as exc:
            raise BadRequest(
                f"invalid sweep config: {exc}", field=f"config.{exc.problems[0][0]}".rstrip(".")
            ) from None
        now = self.clock()
        for _ in range(5):
            sweep_id = generate_run_id()
            async with self.db.write() as conn:
                exists = await conn.scalar(
                    sa.select(sa.func.count()).where(_sweep_key(project_id, sweep_id))
                )
                if exists:
                    continue
                await conn.execute(
                    sweeps_t.insert().values(
                        project_id=project_id,
                        id=sweep_id,
                        config=raw_config,
                        state="running",
                        created_at=now,
                        suggested=0,
                        seed=secrets.randbits(31),
                        updated_at=now,
                    )
                )
            return await self.get(project_id, sweep_id)
        raise Conflict("could not allocate a sweep ID; try again")  # pragma: no cover

    async def _row(self, conn: AsyncConnection, project_id: int, sweep_id: str) -> Any:
        row = (
            await conn.execute(sa.select(sweeps_t).where(_sweep_key(project_id, sweep_id)))
        ).first()
        if row is None:
            raise NotFound(f"no sweep {sweep_id!r} in this project", field="sweep_id")
        return row

    async def get(self, project_id: int, sweep_id: str) -> dict[str, Any]:
        """The sweep with its counts, after releasing gone agents' claims and finishing
        it if nothing is left (so it is up to date even with no agent asking)."""
        await self.maintain(project_id, sweep_id)
        await self._maybe_finish(project_id, sweep_id)
        async with self.db.read() as conn:
            row = await self._row(conn, project_id, sweep_id)
            return await self._describe(conn, row)

    async def list_sweeps(self, project_id: int) -> list[dict[str, Any]]:
        """Every sweep of the project, newest first."""
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(sweeps_t)
                    .where(sweeps_t.c.project_id == project_id)
                    .order_by(sweeps_t.c.created_at.desc())
                )
            ).all()
            return [await self._describe(conn, row) for row in rows]

    async def _describe(self, conn: AsyncConnection, row: Any) -> dict[str, Any]:
        p, s = row.project_id, row.id
        queued = (
            await conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.count(queue_t.c.claimed_by),
                ).where(queue_t.c.project_id == p, queue_t.c.sweep_id == s)
            )
        ).one()
        states: dict[str, int] = dict(
            (
                await conn.execute(
                    sa.select(runs.c.state, sa.func.count())
                    .where(runs.c.project_id == p, runs.c.sweep_id == s)
                    .group_by(runs.c.state)
                )
            ).all()
        )
        agents = await conn.scalar(
            sa.select(sa.func.count()).where(
                agents_t.c.project_id == p, agents_t.c.sweep_id == s, agents_t.c.state == "alive"
            )
        )
        return {
            "id": s,
            "state": row.state,
            "method": self._config(p, s, row.config).method,
            "config": row.config,
            "suggested": row.suggested,
            "queued": int(queued[0]) - int(queued[1]),
            "claimed_from_queue": int(queued[1]),
            "runs": {state: int(n) for state, n in states.items()},
            "agents": int(agents or 0),
            "created_at": rfc3339(row.created_at),
            "updated_at": rfc3339(row.updated_at),
        }

    async def transition(self, project_id: int, sweep_id: str, action: str) -> dict[str, Any]:
        """``pause``, ``resume`` or ``cancel``: one conditional update; 409 if not allowed."""
        sources, target = TRANSITIONS[action]
        async with self.db.write() as conn:
            row = await self._row(conn, project_id, sweep_id)
            result = await conn.execute(
                sweeps_t.update()
                .where(_sweep_key(project_id, sweep_id), sweeps_t.c.state.in_(sources))
                .values(state=target, updated_at=self.clock())
            )
            if result.rowcount != 1:
                raise Conflict(
                    f"cannot {action} sweep {sweep_id!r}: it is {row.state} "
                    f"(only a {' or '.join(sources)} sweep can be {target})"
                )
        return await self.get(project_id, sweep_id)

    # ------------------------------------------------------------------ agents

    async def register_agent(
        self, project_id: int, sweep_id: str, host: str | None, pid: int | None
    ) -> dict[str, Any]:
        """A new agent of the sweep; answers its ID, the sweep, and the heartbeat timeout."""
        now = self.clock()
        agent_id = generate_run_id()
        async with self.db.write() as conn:
            await self._row(conn, project_id, sweep_id)
            await conn.execute(
                agents_t.insert().values(
                    project_id=project_id,
                    id=agent_id,
                    sweep_id=sweep_id,
                    host=host,
                    pid=pid,
                    state="alive",
                    created_at=now,
                    heartbeat_at=now,
                )
            )
        return {
            "id": agent_id,
            "sweep": await self.get(project_id, sweep_id),
            "heartbeat_timeout": self.heartbeat_timeout,
        }

    async def _touch_agent(
        self,
        conn: AsyncConnection,
        project_id: int,
        sweep_id: str,
        agent_id: str,
        now: float,
        **run_id: str | None,
    ) -> Any:
        """Record the agent's heartbeat (and ``run_id=`` its current run, when given);
        404 for an unknown agent, 409 for one declared gone."""
        row = (
            await conn.execute(
                agents_t.update()
                .where(
                    agents_t.c.project_id == project_id,
                    agents_t.c.id == agent_id,
                    agents_t.c.sweep_id == sweep_id,
                    agents_t.c.state == "alive",
                )
                .values(heartbeat_at=now, **run_id)
                .returning(agents_t.c.run_id)
            )
        ).first()
        if row is None:
            known = await conn.scalar(
                sa.select(agents_t.c.state).where(
                    agents_t.c.project_id == project_id,
                    agents_t.c.id == agent_id,
                    agents_t.c.sweep_id == sweep_id,
                )
            )
            if known is None:
                raise NotFound(f"no agent {agent_id!r} of sweep {sweep_id!r}", field="agent_id")
            raise Conflict(
                f"agent {agent_id!r} missed its heartbeats for {self.heartbeat_timeout:g} s and "
                "its claims were released; register again"
            )
        return row

    async def heartbeat(self, project_id: int, sweep_id: str, agent_id: str) -> dict[str, Any]:
        """Keep the agent, and the run it is running, alive. ``stop`` says the sweep was
        cancelled (the agent stops its run)."""
        now = self.clock()
        async with self.db.write() as conn:
            row = await self._touch_agent(conn, project_id, sweep_id, agent_id, now)
            if row.run_id is not None:
                # The agent stands in for a child that does not heartbeat itself.
                await conn.execute(
                    runs.update()
                    .where(
                        runs.c.project_id == project_id,
                        runs.c.id == row.run_id,
                        runs.c.state == "running",
                        runs.c.heartbeat_at < now,
                    )
                    .values(heartbeat_at=now)
                )
            state = await conn.scalar(
                sa.select(sweeps_t.c.state).where(_sweep_key(project_id, sweep_id))
            )
        return {"sweep_state": state, "stop": state == "cancelled"}

    # ------------------------------------------------------------------ claims

    async def maintain(self, project_id: int, sweep_id: str) -> None:
        """Declare silent agents gone and release their claims (own transaction)."""
        async with self.db.write() as conn:
            await self._maintain(conn, project_id, sweep_id, self.clock())

    async def _maintain(
        self, conn: AsyncConnection, project_id: int, sweep_id: str, now: float
    ) -> None:
        """Declare agents silent for the heartbeat timeout gone and release their claims.
        The conditional update makes each stale agent handled by exactly one transaction."""
        self._maintained[(project_id, sweep_id)] = now
        gone = list(
            (
                await conn.execute(
                    agents_t.update()
                    .where(
                        agents_t.c.project_id == project_id,
                        agents_t.c.sweep_id == sweep_id,
                        agents_t.c.state == "alive",
                        agents_t.c.heartbeat_at < now - self.heartbeat_timeout,
                    )
                    .values(state="gone", run_id=None)
                    .returning(agents_t.c.id)
                )
            ).scalars()
        )
        if gone:
            await self._release(conn, project_id, sweep_id, gone, now)

    async def _release(
        self, conn: AsyncConnection, project_id: int, sweep_id: str, gone: list[str], now: float
    ) -> None:
        running = sa.select(runs.c.id).where(
            runs.c.project_id == project_id, runs.c.state == "running"
        )
        in_queue = queue_t.c.project_id == project_id
        # Claimed queued runs whose run is still running: the reaper queues them again once
        # they are stale; the others return to the queue now.
        await conn.execute(
            queue_t.delete().where(
                in_queue, queue_t.c.claimed_by.in_(gone), queue_t.c.run_id.in_(running)
            )
        )
        await conn.execute(
            queue_t.update()
            .where(in_queue, queue_t.c.claimed_by.in_(gone))
            .values(claimed_by=None, claimed_at=None)
        )
        # New runs handed to a gone agent that never started them: queue them.
        never_started = (
            await conn.execute(
                sa.select(sweep_runs_t.c.run_id).where(
                    sweep_runs_t.c.project_id == project_id,
                    sweep_runs_t.c.agent_id.in_(gone),
                    sweep_runs_t.c.status == "claimed",
                    ~sa.exists().where(
                        runs.c.project_id == project_id, runs.c.id == sweep_runs_t.c.run_id
                    ),
                    ~sa.exists().where(in_queue, queue_t.c.run_id == sweep_runs_t.c.run_id),
                )
            )
        ).scalars()
        for run_id in never_started:
            await conn.execute(
                queue_t.insert().values(
                    project_id=project_id, sweep_id=sweep_id, run_id=run_id, enqueued_at=now
                )
            )
        await conn.execute(
            sweep_runs_t.update()
            .where(sweep_runs_t.c.project_id == project_id, sweep_runs_t.c.agent_id.in_(gone))
            .values(status="released", agent_id=None, updated_at=now)
        )

    async def next_run(self, project_id: int, sweep_id: str, agent_id: str) -> dict[str, Any]:
        """The agent's next run: the oldest queued run first, else a new parameter set from
        the search method. ``run`` is None when there is nothing to run now; ``sweep_state``
        then says whether to wait (``paused``, or ``running`` with runs still going) or stop.
        One transaction; the agent's own row is updated last (a gone agent's claim is rolled
        back with the 409)."""
        now = self.clock()
        async with self.db.write() as conn:
            last = self._maintained.get((project_id, sweep_id), -math.inf)
            if now - last >= min(1.0, self.heartbeat_timeout / 4):
                await self._maintain(conn, project_id, sweep_id, now)
            row = await self._row(conn, project_id, sweep_id)
            run = None
            if row.state == "running":
                config = self._config(project_id, sweep_id, row.config)
                run = await self._claim_queued(conn, project_id, sweep_id, agent_id, config, now)
                if run is None:
                    run = await self._claim_new(conn, project_id, row, agent_id, config, now)
            await self._touch_agent(
                conn, project_id, sweep_id, agent_id, now, run_id=run["id"] if run else None
            )
            if run is not None:
                return {"run": run, "sweep_state": "running"}
            if row.state != "running":
                return {"run": None, "sweep_state": row.state}
        state = await self._maybe_finish(project_id, sweep_id)
        return {"run": None, "sweep_state": state}

    def _config(self, project_id: int, sweep_id: str, raw: Any) -> SweepConfig:
        """The sweep's parsed config (it never changes, so it is parsed once)."""
        key = (project_id, sweep_id)
        config = self._configs.get(key)
        if config is None:
            config = self._configs[key] = parse_config(raw)
        return config

    def _search(
        self, project_id: int, sweep_id: str, config: SweepConfig, seed: int
    ) -> SearchMethod:
        """The sweep's search method (stateless, so built once per sweep)."""
        key = (project_id, sweep_id)
        search = self._searches.get(key)
        if search is None:
            search = self._searches[key] = make_search(config, seed)
        return search

    async def _claim_queued(
        self,
        conn: AsyncConnection,
        project_id: int,
        sweep_id: str,
        agent_id: str,
        config: SweepConfig,
        now: float,
    ) -> dict[str, Any] | None:
        run_of_entry = sa.and_(runs.c.project_id == project_id, runs.c.id == queue_t.c.run_id)
        while True:
            candidate = (
                await conn.execute(
                    sa.select(
                        queue_t.c.id,
                        queue_t.c.run_id,
                        runs.c.state,
                        runs.c.requeues,
                        runs.c.config,
                    )
                    .select_from(queue_t.outerjoin(runs, run_of_entry))
                    .where(
                        queue_t.c.project_id == project_id,
                        queue_t.c.sweep_id == sweep_id,
                        queue_t.c.claimed_by.is_(None),
                        sa.or_(runs.c.state.is_(None), runs.c.state != "running"),
                    )
                    .order_by(queue_t.c.id)
                    .limit(1)
                    .with_for_update(skip_locked=True, of=queue_t)
                )
            ).first()
            if candidate is None:
                return None
            known = candidate.state is not None
            if known and (
                candidate.requeues > config.max_requeues
                or candidate.state in ("finished", "failed")
            ):
                # Over the requeue limit (a crash loop ends here) or it has ended for good
                # since it was queued: it stays as it ended.
                await conn.execute(queue_t.delete().where(queue_t.c.id == candidate.id))
                continue
            claimed = await conn.execute(
                queue_t.update()
                .where(queue_t.c.id == candidate.id, queue_t.c.claimed_by.is_(None))
                .values(claimed_by=agent_id, claimed_at=now)
            )
            if claimed.rowcount != 1:  # pragma: no cover - the row lock makes this rare
                continue
            # One launch per run: drop any other entry of the same run still waiting.
            await conn.execute(
                queue_t.delete().where(
                    queue_t.c.project_id == project_id,
                    queue_t.c.run_id == candidate.run_id,
                    queue_t.c.claimed_by.is_(None),
                )
            )
            swept = (
                await conn.execute(
                    sweep_runs_t.update()
                    .where(
                        sweep_runs_t.c.project_id == project_id,
                        sweep_runs_t.c.run_id == candidate.run_id,
                    )
                    .values(
                        status="claimed",
                        agent_id=agent_id,
                        launches=sweep_runs_t.c.launches + 1,
                        updated_at=now,
                    )
                    .returning(sweep_runs_t.c.params)
                )
            ).first()
            fallback = candidate.config if known else {}
            return {
                "id": candidate.run_id,
                "params": swept.params if swept is not None else fallback,
                "requeued": known,
                "requeues": candidate.requeues if known else 0,
                "queue_id": candidate.id,
            }

    async def _claim_new(
        self,
        conn: AsyncConnection,
        project_id: int,
        sweep: Any,
        agent_id: str,
        config: SweepConfig,
        now: float,
    ) -> dict[str, Any] | None:
        limit = math.inf if config.run_cap is None else config.run_cap
        search = self._search(project_id, sweep.id, config, int(sweep.seed))
        if isinstance(search, GridSearch):
            limit = min(limit, search.size)
        if sweep.suggested >= limit:
            return None
        conditions = [_sweep_key(project_id, sweep.id), sweeps_t.c.state == "running"]
        if math.isfinite(limit):
            conditions.append(sweeps_t.c.suggested < int(limit))
        number = await conn.scalar(
            sweeps_t.update()
            .where(*conditions)
            .values(suggested=sweeps_t.c.suggested + 1, updated_at=now)
            .returning(sweeps_t.c.suggested)
        )
        if number is None:
            return None
        index = int(number) - 1
        if config.method == "bayes":
            trials = await self._trials(conn, project_id, sweep.id, config)
            params = await asyncio.to_thread(search.suggest, index, trials)
        else:
            params = search.suggest(index, [])
        if params is None:  # pragma: no cover - the limit above covers grid exhaustion
            return None
        for _ in range(5):
            run_id = generate_run_id()
            taken = await conn.scalar(
                sa.select(sa.func.count()).where(
                    runs.c.project_id == project_id, runs.c.id == run_id
                )
            )
            if not taken:
                break
        await conn.execute(
            sweep_runs_t.insert().values(
                project_id=project_id,
                run_id=run_id,
                sweep_id=sweep.id,
                seq=index,
                params=params,
                status="claimed",
                agent_id=agent_id,
                launches=1,
                created_at=now,
                updated_at=now,
            )
        )
        return {"id": run_id, "params": params, "requeued": False, "requeues": 0, "queue_id": None}

    async def _trials(
        self, conn: AsyncConnection, project_id: int, sweep_id: str, config: SweepConfig
    ) -> list[Trial]:
        """Earlier suggestions with their outcome: the last logged value of the metric of
        each finished run; failed or crashed runs count as failed trials."""
        assert config.metric is not None
        rows = (
            await conn.execute(
                sa.select(sweep_runs_t.c.run_id, sweep_runs_t.c.params, runs.c.state)
                .select_from(
                    sweep_runs_t.outerjoin(
                        runs,
                        sa.and_(
                            runs.c.project_id == sweep_runs_t.c.project_id,
                            runs.c.id == sweep_runs_t.c.run_id,
                        ),
                    )
                )
                .where(sweep_runs_t.c.project_id == project_id, sweep_runs_t.c.sweep_id == sweep_id)
                .order_by(sweep_runs_t.c.seq)
            )
        ).all()
        finished = [r.run_id for r in rows if r.state == "finished"]
        values: dict[str, float] = {}
        if finished:
            metric = history.c.data[config.metric.name].as_string()
            points = await conn.execute(
                sa.select(history.c.run_id, metric)
                .where(
                    history.c.project_id == project_id,
                    history.c.run_id.in_(finished),
                    metric.is_not(None),
                )
                .order_by(history.c.run_id, history.c.step)
            )
            for run_id, value in points:
                try:
                    values[run_id] = float(value)
                except (TypeError, ValueError):
                    continue
        trials = []
        for r in rows:
            done = r.state in ("finished", "failed", "crashed")
            trials.append(Trial(params=r.params, value=values.get(r.run_id), done=done))
        return trials

    async def _maybe_finish(self, project_id: int, sweep_id: str) -> str:
        """Mark the sweep finished when nothing is left to search, queued or running."""
        async with self.db.write() as conn:
            row = await self._row(conn, project_id, sweep_id)
            if row.state != "running":
                return str(row.state)
            config = self._config(project_id, sweep_id, row.config)
            search = self._search(project_id, sweep_id, config, int(row.seed))
            limit = math.inf if config.run_cap is None else config.run_cap
            if isinstance(search, GridSearch):
                limit = min(limit, search.size)
            if row.suggested < limit:
                return "running"
            busy = await conn.scalar(
                sa.select(
                    sa.exists().where(
                        queue_t.c.project_id == project_id, queue_t.c.sweep_id == sweep_id
                    )
                    | sa.exists().where(
                        sweep_runs_t.c.project_id == project_id,
                        sweep_runs_t.c.sweep_id == sweep_id,
                        sweep_runs_t.c.status == "claimed",
                    )
                    | sa.exists().where(
                        runs.c.project_id == project_id,
                        runs.c.sweep_id == sweep_id,
                        runs.c.state == "running",
                    )
                )
            )
            if busy:
                return "running"
            await conn.execute(
                sweeps_t.update()
                .where(_sweep_key(project_id, sweep_id), sweeps_t.c.state == "running")
                .values(state="finished", updated_at=self.clock())
            )
            return "finished"

    async def report_exit(
        self, project_id: int, sweep_id: str, agent_id: str, run_id: str, exit_code: int
    ) -> dict[str, Any]:
        """The agent's child ended with ``exit_code``: its claim is done. (The run's own
        state was set through the run API, which queues it again if it was preempted.)"""
        now = self.clock()
        async with self.db.write() as conn:
            await self._touch_agent(conn, project_id, sweep_id, agent_id, now)
            await conn.execute(
                sweep_runs_t.update()
                .where(
                    sweep_runs_t.c.project_id == project_id,
                    sweep_runs_t.c.run_id == run_id,
                    sweep_runs_t.c.agent_id == agent_id,
                )
                .values(status="ended", agent_id=None, exit_code=exit_code, updated_at=now)
            )
            await conn.execute(
                queue_t.delete().where(
                    queue_t.c.project_id == project_id,
                    queue_t.c.claimed_by == agent_id,
                    queue_t.c.run_id == run_id,
                )
            )
            await conn.execute(
                agents_t.update()
                .where(agents_t.c.project_id == project_id, agents_t.c.id == agent_id)
                .values(run_id=None)
            )
        return {"sweep_state": await self._maybe_finish(project_id, sweep_id)}
