"""The study store's schema is Alembic's (service/core/migrations): a fresh database is created at the
newest revision, a database made by the previous schema -- with or without Alembic's version table
(the code before migrations made it with ``create_all``) -- is upgraded with its rows intact, and the
migrated schema equals the ORM models. On SQLite and on PostgreSQL (a database of its own per test)."""

from __future__ import annotations

import json

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.core.store import MIGRATIONS_DIR, Base, StudyStatus, StudyStore


def _cfg(conn) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def _old_database(url: str, *, with_version_table: bool) -> None:
    """A database as the previous schema (0001) left it, with one study and one key in it."""
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_cfg(conn), "0001")
        conn.execute(text(
            "INSERT INTO studies (id, name, status, spec_json, num_trials, resume_count, idempotency_key, "
            "request_hash, created_at, updated_at) VALUES ('abc123', 'old', 'RUNNING', :spec, 4, 0, 'idem-1', "
            "'h1', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"spec": json.dumps({"name": "old"})})
        conn.execute(text("INSERT INTO api_keys (id, name, sha256, created_at) VALUES "
                          "('k1', 'ci', :h, CURRENT_TIMESTAMP)"), {"h": "0" * 64})
        if not with_version_table:
            conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()


def _revision(url: str) -> str | None:
    engine = create_engine(url)
    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
    engine.dispose()
    return rev


def _head() -> str:
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head() or ""


@pytest.mark.parametrize("with_version_table", [True, False], ids=["alembic-0001", "pre-alembic"])
def test_upgrade_from_previous_schema_keeps_rows(db_url: str, with_version_table: bool) -> None:
    _old_database(db_url, with_version_table=with_version_table)
    store = StudyStore(db_url)
    store.migrate()
    assert _revision(db_url) == _head() == "0002"
    row = store.get("abc123")
    assert (row.name, row.status_enum, row.num_trials, row.api_key_id) == ("old", StudyStatus.RUNNING, 4, None)
    assert [k.id for k in store.list_api_keys()] == ["k1"]
    # the new schema works: owner column, shared limits
    new, created = store.create(name="new", spec_json="{}", num_trials=1, max_active=5, api_key_id="k1")
    assert created and store.get(new.id).api_key_id == "k1"
    assert store.list(api_key_id="k1")[1] == 1
    assert store.take_token("key:k1", 1.0, 2, 1000.0) == 0.0
    store.close()


def test_fresh_database_matches_models_and_migrate_is_idempotent(db_url: str) -> None:
    store = StudyStore(db_url)
    store.migrate()
    store.migrate()  # a second API process starting later: nothing to do
    assert _revision(db_url) == _head()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    assert not diff, f"the migrations and the ORM models differ: {diff}"
    assert {"studies", "api_keys", "rate_buckets", "store_locks", "alembic_version"} <= tables
    store.close()
