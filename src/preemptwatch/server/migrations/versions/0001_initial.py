"""Initial schema: projects, API keys, sweeps, runs, history, files, run queue.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

RUNNING = sa.text("state = 'running'")


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "sweeps",
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="running"),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "runs",
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
            "state IN ('running', 'finished', 'failed', 'preempted', 'crashed')",
            name="ck_runs_state",
        ),
    )
    op.create_index(
        "ix_runs_running_heartbeat",
        "runs",
        ["heartbeat_at"],
        postgresql_where=RUNNING,
        sqlite_where=RUNNING,
    )
    op.create_index(
        "ix_runs_running_instance",
        "runs",
        ["project_id", "instance_id"],
        postgresql_where=RUNNING,
        sqlite_where=RUNNING,
    )
    op.create_index("ix_runs_project_created", "runs", ["project_id", "created_at"])
    op.create_index("ix_runs_project_sweep", "runs", ["project_id", "sweep_id"])
    op.create_table(
        "history",
        sa.Column("project_id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("step", sa.BigInteger, primary_key=True),
        sa.Column("incarnation", sa.Integer, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("time", sa.Double, nullable=False),
        sa.ForeignKeyConstraint(["project_id", "run_id"], ["runs.project_id", "runs.id"]),
    )
    op.create_table(
        "files",
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
    op.create_table(
        "run_queue",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.Integer, nullable=False),
        sa.Column("sweep_id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("enqueued_at", sa.Double, nullable=False),
    )
    op.create_index("ix_run_queue_sweep", "run_queue", ["project_id", "sweep_id", "id"])


def downgrade() -> None:
    op.drop_table("run_queue")
    op.drop_table("files")
    op.drop_table("history")
    op.drop_index("ix_runs_project_sweep", "runs")
    op.drop_index("ix_runs_project_created", "runs")
    op.drop_index("ix_runs_running_instance", "runs")
    op.drop_index("ix_runs_running_heartbeat", "runs")
    op.drop_table("runs")
    op.drop_table("sweeps")
    op.drop_table("api_keys")
    op.drop_table("projects")
