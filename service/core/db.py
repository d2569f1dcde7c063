"""Database URLs: checking them, hiding their passwords, and one PostgreSQL server for all three stores.

The study store, Optuna's storage and MLflow's backend are SQLAlchemy URLs. The embedded default keeps
each in a SQLite file under ``home``; ``bonn-sweep up --db postgresql://user@host:5432/name`` (setting
``BONN_SWEEP_DB_URL``) puts all three on one PostgreSQL server instead, in three databases named after
the URL's database (the prefix, default ``bonn_sweep``): ``<name>_studies``, ``<name>_optuna`` and
``<name>_mlflow`` (:func:`derive_urls`), created when missing (:func:`ensure_databases`). Three databases
and not one: Optuna and the study store both have a ``studies`` table, and Optuna and MLflow both keep
an ``alembic_version`` table.

A password is never printed: :func:`redact` is what goes into messages and logs. A bad URL is a
:class:`DatabaseUrlError`, an unreachable server a :class:`DatabaseUnavailable`; both carry a one-line
message for the CLI (never a traceback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

#: the database prefix when ``--db`` names none
DEFAULT_PREFIX = "bonn_sweep"
STORE_SUFFIXES = {"store": "studies", "optuna": "optuna", "mlflow": "mlflow"}
_PREFIX_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,50}$")


class DatabaseUrlError(ValueError):
    """A database URL that cannot be used (the message says why, without the password)."""


class DatabaseUnavailable(RuntimeError):
    """The database server cannot be reached or refuses us (the message says which and why)."""


def redact(url: str | URL | None) -> str:
    """The URL with its password replaced by ``***`` (anything unparsable: a fixed placeholder)."""
    if url is None:
        return ""
    try:
        u = make_url(url) if isinstance(url, str) else url
    except Exception:  # noqa: BLE001 - never echo something that may hold a secret
        return "<unparsable database URL>"
    return u.render_as_string(hide_password=True)


def is_postgres(url: str | URL | None) -> bool:
    try:
        return bool(url) and make_url(url).get_backend_name() == "postgresql"  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001
        return False


def parse_server_url(url: str) -> URL:
    """Check a ``--db`` URL: ``postgresql://`` (or ``postgresql+psycopg2://``) with a host; the database
    name, if any, becomes the prefix of the three databases and must be a plain identifier."""
    try:
        u = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(
            f"not a database URL: {redact(url)!r} (expected postgresql://user[:password]@host[:port][/prefix])"
        ) from None
    if u.get_backend_name() != "postgresql":
        raise DatabaseUrlError(
            f"--db / BONN_SWEEP_DB_URL must be a postgresql:// URL, got {u.drivername}:// "
            "(the embedded default, without --db, is SQLite under the home folder)"
        )
    if u.drivername not in ("postgresql", "postgresql+psycopg2"):
        raise DatabaseUrlError(f"unsupported driver {u.drivername!r}: use postgresql:// or postgresql+psycopg2://")
    if not u.host:
        raise DatabaseUrlError(f"the database URL {redact(u)!r} names no host")
    if u.database and not _PREFIX_RE.match(u.database):
        raise DatabaseUrlError(
            f"database name {u.database!r} in {redact(u)!r}: use letters, digits and _ (it is the prefix "
            "of the three databases <name>_studies, <name>_optuna, <name>_mlflow)"
        )
    return u


@dataclass(frozen=True)
class DbUrls:
    store: str
    optuna: str
    mlflow: str

    def as_dict(self) -> dict[str, str]:
        return {"store": self.store, "optuna": self.optuna, "mlflow": self.mlflow}


def derive_urls(server_url: str) -> DbUrls:
    """The three store URLs (passwords included: pass them on, never print them) on one server."""
    u = parse_server_url(server_url)
    prefix = u.database or DEFAULT_PREFIX
    u = u.set(drivername="postgresql+psycopg2")
    names = {k: u.set(database=f"{prefix}_{suffix}").render_as_string(hide_password=False)
             for k, suffix in STORE_SUFFIXES.items()}
    return DbUrls(**names)


def _connect_error(u: URL, exc: BaseException) -> DatabaseUnavailable:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    text = reason[0] if reason else type(exc).__name__
    if u.password:
        text = text.replace(str(u.password), "***")
    return DatabaseUnavailable(f"cannot reach the database server {redact(u)}: {text}")


def ensure_databases(urls: DbUrls | list[str], *, timeout_s: float = 5.0) -> list[str]:
    """Create the PostgreSQL databases of ``urls`` that do not exist yet; returns the ones created.
    :class:`DatabaseUnavailable` when the server cannot be reached or refuses to create them."""
    from sqlalchemy import create_engine, text

    targets = [make_url(x) for x in (urls.as_dict().values() if isinstance(urls, DbUrls) else urls)]
    created: list[str] = []
    if not targets:
        return created
    admin = targets[0].set(database="postgres")
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": int(max(1, timeout_s))},
                           poolclass=_null_pool())
    try:
        with engine.connect() as conn:
            for t in targets:
                exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": t.database}).first()
                if exists:
                    continue
                try:
                    conn.execute(text(f'CREATE DATABASE "{t.database}"'))
                    created.append(str(t.database))
                except Exception as exc:  # noqa: BLE001 - e.g. a race with another `up`, or no CREATEDB right
                    if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": t.database}).first():
                        continue
                    raise DatabaseUnavailable(
                        f"cannot create database {t.database!r} on {redact(admin)}: "
                        f"{str(getattr(exc, 'orig', exc)).strip().splitlines()[0]} (create it, or grant CREATEDB)"
                    ) from None
    except DatabaseUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _connect_error(admin, exc) from None
    finally:
        engine.dispose()
    return created


def drop_databases(urls: DbUrls | list[str]) -> None:
    """Drop the PostgreSQL databases of ``urls`` (tests), closing other sessions on them first."""
    from sqlalchemy import create_engine, text

    targets = [make_url(x) for x in (urls.as_dict().values() if isinstance(urls, DbUrls) else urls)]
    if not targets:
        return
    engine = create_engine(targets[0].set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=_null_pool())
    try:
        with engine.connect() as conn:
            for t in targets:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{t.database}" WITH (FORCE)'))
    finally:
        engine.dispose()


def check_reachable(url: str, *, timeout_s: float = 5.0) -> None:
    """Connect once to ``url`` (any SQLAlchemy URL): :class:`DatabaseUnavailable` with a clear reason."""
    from sqlalchemy import create_engine, text

    u = make_url(url)
    kwargs: dict[str, Any] = {"poolclass": _null_pool()}
    if u.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": int(max(1, timeout_s))}
    engine = create_engine(u, **kwargs)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        raise _connect_error(u, exc) from None
    finally:
        engine.dispose()


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool
