"""Sweeps: search progress on sweeps, claims on the run queue, agents and sweep runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sweeps", sa.Column("suggested", sa.Integer, nullable=False, server_default="0"))
    op.add_column("sweeps", sa.Column("seed", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("sweeps", sa.Column("updated_at", sa.Double, nullable=True))
    op.add_column("run_queue", sa.Column("claimed_by", sa.String(64), nullable=True))
    op.add_column("run_queue", sa.Column("claimed_at", sa.Double, nullable=True))
    # claims scan only the unclaimed entries, oldest first
    op.create_index(
        "ix_run_queue_unclaimed",
        "run_queue",
        ["project_id", "sweep_id", "id"],
        postgresql_where=sa.text("claimed_by IS NULL"),
        sqlite_where=sa.text("claimed_by IS NULL"),
    )
    op.create_index("ix_run_queue_run", "run_queue", ["project_id", "run_id"])
    op.create_table(
        "sweep_agents",
        sa.Column("project_id", sa.Integer, primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("sweep_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
    )
    op.create_index(
        "ix_sweep_agents_alive",
        "sweep_agents",
        ["project_id", "sweep_id", "heartbeat_at"],
        postgresql_where=sa.text("state = 'alive'"),
        sqlite_where=sa.text("state = 'alive'"),
    )
    op.create_table(
        "sweep_runs",
        sa.Column("project_id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("sweep_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=True),
        sa.Column("launches", sa.Integer, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.UniqueConstraint("project_id", "sweep_id", "seq", name="uq_sweep_runs_seq"),
    )
    op.create_index("ix_sweep_runs_agent", "sweep_runs", ["project_id", "agent_id"])


def downgrade() -> None:
    op.drop_index("ix_sweep_runs_agent", "sweep_runs")
    op.drop_table("sweep_runs")
    op.drop_index("ix_sweep_agents_alive", "sweep_agents")
    op.drop_table("sweep_agents")
    op.drop_index("ix_run_queue_run", "run_queue")
    op.drop_index("ix_run_queue_unclaimed", "run_queue")
    with op.batch_alter_table("run_queue") as batch:
        batch.drop_column("claimed_at")
        batch.drop_column("claimed_by")
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("seed")
        batch.drop_column("suggested")
