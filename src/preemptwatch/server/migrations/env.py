"""Alembic environment: always run with a connection handed over by `migrate.upgrade`."""

from __future__ import annotations

from alembic import context

from preemptwatch.server.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through preemptwatch.server.db.Database.migrate (it passes a connection)"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
