"""Alembic revisions of the study store (see the package docstring)."""
