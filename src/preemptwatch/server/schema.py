"""The database schema (SQLAlchemy Core). Times are Unix seconds (float), the same on
SQLite and PostgreSQL, so the reaper compares numbers. Alembic migrations in
``migrations/versions`` create exactly these tables."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

#: States of a run. ``preempting`` is a separate flag on a running run.
RUN_STATES = ("running", "finished", "failed", "preempted", "crashed")
ENDED_STATES = ("finished", "failed", "preempted", "crashed")

#: ``state = 'running'`` as a literal, so the planners of both engines can use the partial
#: indexes below (a bound parameter would hide the predicate from them).
RUNNING_LITERAL: sa.ColumnElement[str] = sa.literal_column("'running'")

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

sweeps = sa.Table(
    "sweeps",
    metadata,
    sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, server_default="running"),
    sa.Column("created_at", sa.Double, nullable=False),
    # search progress (migration 0002)
    sa.Column("suggested", sa.Integer, nullable=False, server_default="0"),
    sa.Column("seed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.Double),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("preempting", sa.Boolean, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("incarnation", sa.Integer, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("notice", sa.JSON, nullable=True),
    sa.Column("instance_id", sa.String(255), nullable=True),
    sa.Column("host", sa.String(255), nullable=True),
    sa.Column("sweep_id", sa.String(64), nullable=True),
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("requeues", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.CheckConstraint(
        "state IN ('running', 'finished', 'failed', 'preempted', 'crashed')", name="ck_runs_state"
    ),
)
sa.Index(
    "ix_runs_running_heartbeat",
    runs.c.heartbeat_at,
    postgresql_where=sa.text("state = 'running'"),
    sqlite_where=sa.text("state = 'running'"),
)
sa.Index(
    "ix_runs_running_instance",
    runs.c.project_id,
    runs.c.instance_id,
    postgresql_where=sa.text("state = 'running'"),
    sqlite_where=sa.text("state = 'running'"),
)
sa.Index("ix_runs_project_created", runs.c.project_id, runs.c.created_at)
sa.Index("ix_runs_project_sweep", runs.c.project_id, runs.c.sweep_id)

history = sa.Table(
    "history",
    metadata,
    sa.Column("project_id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("step", sa.BigInteger, primary_key=True),
    sa.Column("incarnation", sa.Integer, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("time", sa.Double, nullable=False),
    sa.ForeignKeyConstraint(["project_id", "run_id"], ["runs.project_id", "runs.id"]),
)

files = sa.Table(
    "files",
    metadata,
    sa.Column("project_id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("storage_key", sa.String(512), nullable=False),
    sa.Column("incarnation", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.ForeignKeyConstraint(["project_id", "run_id"], ["runs.project_id", "runs.id"]),
)

run_queue = sa.Table(
    "run_queue",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("project_id", sa.Integer, nullable=False),
    sa.Column("sweep_id", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("enqueued_at", sa.Double, nullable=False),
    # an agent's claim (migration 0002)
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("claimed_at", sa.Double),
)
sa.Index("ix_run_queue_sweep", run_queue.c.project_id, run_queue.c.sweep_id, run_queue.c.id)

#: Agents of a sweep (migration 0002).
sweep_agents = sa.Table(
    "sweep_agents",
    metadata,
    sa.Column("project_id", sa.Integer, primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("sweep_id", sa.String(64), nullable=False),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
)

#: The runs a sweep's search handed out, with their parameters (migration 0002).
sweep_runs = sa.Table(
    "sweep_runs",
    metadata,
    sa.Column("project_id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("sweep_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("agent_id", sa.String(64)),
    sa.Column("launches", sa.Integer, nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.UniqueConstraint("project_id", "sweep_id", "seq", name="uq_sweep_runs_seq"),
)
