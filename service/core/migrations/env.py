"""Alembic environment of the study store: runs on the connection the caller passes in
``config.attributes["connection"]`` (inside its transaction); no ini file, no autogenerate."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
