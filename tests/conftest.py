"""Shared test helpers: free ports, polling, and an environment that never turns Ray token auth on.

Ray 2.60 turns token auth on by default for a local ``ray.init()`` / ``ray start`` and writes
``~/.ray/auth_token``, which then switches every later cluster and client of this user to token mode.
Tests run with ``RAY_AUTH_MODE=disabled`` so they never leave such a token behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def get_free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    from service.launch.ports import free_port

    return free_port()


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; its value is returned. Exceptions count as
    "not yet"; the last one is reported on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


@pytest.fixture
def free_port() -> Callable[[], int]:
    return get_free_port


# -- PostgreSQL (127.0.0.1:5432 on the project's machines and in CI; override with BONN_SWEEP_TEST_PG) ----

PG_SERVER = os.environ.get("BONN_SWEEP_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")


def pg_available() -> str | None:
    """None when the test PostgreSQL server answers, else why not (tests that need it skip with it)."""
    from service.core.db import DatabaseUnavailable, check_reachable

    try:
        check_reachable(f"{PG_SERVER}/postgres", timeout_s=3)
        return None
    except DatabaseUnavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. no driver installed
        return f"{type(exc).__name__}: {exc}"


def unique_db_name(prefix: str = "bonn_test") -> str:
    """A database name no other test run uses (pid + random)."""
    import secrets

    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


@pytest.fixture
def pg_url() -> Any:
    """A fresh, empty PostgreSQL database of its own (SQLAlchemy URL), dropped afterwards."""
    from service.core.db import drop_databases, ensure_databases

    why = pg_available()
    if why:
        pytest.skip(f"PostgreSQL not reachable: {why}")
    url = f"{PG_SERVER}/{unique_db_name()}"
    ensure_databases([url])
    try:
        yield url
    finally:
        drop_databases([url])


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A fresh study-store URL: a SQLite file, then a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
    else:
        yield request.getfixturevalue("pg_url")
