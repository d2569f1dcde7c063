"""Real-stack fixtures: a Ray head, an MLflow server and the API (uvicorn), started by
:func:`service.launch.stack.start_stack` in a temporary home on free ports, stopped by pid at the end.

``stack`` (session scope) exposes ``.api_url``, ``.ray_dashboard_url``, ``.ray_address`` (GCS address
for ``ray.init(address=...)``), ``.mlflow_uri``, ``.home`` (str; ``.home_path`` a Path), ``.settings``
(a :class:`service.core.settings.Settings` for this stack), ``.env()`` (environment variables pointing
at it, ``BONN_SWEEP_API_KEY`` included) and ``.api_key`` (the key :func:`start_stack` wrote to
``{home}/api-key``; the ``api`` client sends it). The stack is stopped even when tests fail; a
watchdog process stops it if pytest itself is killed. Set ``BONN_SWEEP_TEST_STACK_HOME`` to reuse a stack started with ``bonn-sweep up`` (or a
previous run) in that home: it is then started if needed and left running.

``stack_db`` picks where the stack keeps its three stores: every test runs on SQLite, and tests marked
``@pytest.mark.postgres`` run on PostgreSQL too (``postgres(only=True)``: only there; databases of their own on ``PG_SERVER``, made by
``bonn-sweep up --db`` -- ``start_stack(db_url=...)`` -- and dropped at the end). One stack runs at a
time; pytest groups the tests by database, so each is started about once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.launch.stack import start_stack, stop_stack
from service.launch.stack_record import Stack
from service.launch.watchdog import spawn_watchdog
from tests.conftest import PG_SERVER, pg_available, unique_db_name, wait_until
from tests.integration.pg_proxy import TcpProxy


#: the databases a test stack can keep its three stores in (``stack_db``)
STACK_DBS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses the stack runs on SQLite; a test marked ``postgres`` runs on PostgreSQL as
    well (``[sqlite]`` / ``[postgres]``): one fixture-level switch, no copied tests."""
    if "stack_db" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("postgres")
    dbs = ["sqlite"] if mark is None else ["postgres"] if mark.kwargs.get("only") else list(STACK_DBS)
    metafunc.parametrize("stack_db", dbs, indirect=True, scope="session")


@pytest.fixture(scope="session")
def stack_db(request: pytest.FixtureRequest) -> str:
    """Where the stack keeps the study store, Optuna and MLflow: ``sqlite`` (files in its home) or
    ``postgres`` (three databases of its own on the test server, dropped at the end)."""
    return getattr(request, "param", "sqlite")


class _Stacks:
    """The test stacks of this session, at most one running at a time (2 cores): asking for the other
    database stops the running one first (and drops its PostgreSQL databases). The ``postgres`` stack
    reaches the server through :attr:`proxy`, a TCP proxy the session owns, so a test can "restart
    the database" (``proxy.stop()`` / ``start()``) without touching the shared server."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path_factory
        self.running: dict[str, tuple[Path, Stack, Any, str | None]] = {}
        self.proxy: TcpProxy | None = None

    def get(self, db: str, db_url: str | None = None) -> Stack:
        """The stack on ``db`` (``sqlite``, ``postgres``, or any name with its own ``db_url``)."""
        if db in self.running:
            return self.running[db][1]
        for other in list(self.running):
            self.stop(other)
        if db == "postgres":
            why = pg_available()
            if why:
                pytest.skip(f"PostgreSQL not reachable: {why}")
            from sqlalchemy.engine import make_url

            upstream = make_url(f"{PG_SERVER}/postgres")
            if self.proxy is None:
                self.proxy = TcpProxy((upstream.host or "127.0.0.1", upstream.port or 5432)).start()
            db_url = upstream.set(port=self.proxy.port, database=unique_db_name("bonn_it")).render_as_string(
                hide_password=False)
        home = self.tmp.mktemp(f"stack-{db}") / "home"
        watchdog = spawn_watchdog(home)
        t0 = time.monotonic()
        try:
            s = start_stack(home, num_cpus=2, with_api=True, db_url=db_url)
        except BaseException:
            self.running[db] = (home, None, watchdog, db_url)  # type: ignore[assignment]
            self.stop(db)
            raise
        print(f"\n[stack {db}] up in {time.monotonic() - t0:.1f}s: api {s.api_url}, ray {s.ray_dashboard_url}, "
              f"mlflow {s.mlflow_uri}, databases {s.db_display}")
        self.running[db] = (home, s, watchdog, db_url)
        return s

    def stop(self, db: str) -> None:
        home, _s, watchdog, db_url = self.running.pop(db)
        try:
            stop_stack(home, remove_temp=True, quiet=True)
        finally:
            if watchdog is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(watchdog.pid, signal.SIGTERM)
                watchdog.wait(timeout=10)
            if db_url:
                from service.core.db import derive_urls, drop_databases

                if self.proxy is not None and self.proxy._listener is None:
                    self.proxy.start()  # a test left "the database" down

                with contextlib.suppress(Exception):
                    drop_databases(derive_urls(db_url))

    def stop_all(self) -> None:
        for db in list(self.running):
            self.stop(db)
        if self.proxy is not None:
            self.proxy.stop()


@pytest.fixture(scope="session")
def _stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Stacks]:
    stacks = _Stacks(tmp_path_factory)
    try:
        yield stacks
    finally:
        stacks.stop_all()


@pytest.fixture(scope="session")
def stack(stack_db: str, _stacks: _Stacks) -> Iterator[Stack]:
    reuse = os.environ.get("BONN_SWEEP_TEST_STACK_HOME")
    if reuse:
        if stack_db != "sqlite":
            pytest.skip("BONN_SWEEP_TEST_STACK_HOME reuses one stack: its [postgres] variant is not run")
        yield start_stack(reuse, num_cpus=2, with_api=True)
        return
    yield _stacks.get(stack_db)


@pytest.fixture(scope="session")
def api(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client of the stack's API, sending the stack's API key."""
    key = stack.api_key
    assert key, f"start_stack wrote no API key to {stack.home}/api-key"
    with httpx.Client(base_url=stack.api_url or "", timeout=60.0, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


def wait_for_status(api: httpx.Client, study_id: str, statuses: set[str], timeout: float = 300.0) -> dict:
    """GET /studies/{id} until its status is one of ``statuses``; returns the body."""

    def poll() -> dict | None:
        body = api.get(f"/studies/{study_id}").json()
        return body if body.get("status") in statuses else None

    return wait_until(poll, timeout=timeout, interval=1.0, what=f"study {study_id} to reach {sorted(statuses)}")


@pytest.fixture(scope="module")
def cluster(request, _stacks, tmp_path_factory):
    """Ray head + MLflow server for driver-level tests: the session's SQLite stack when it starts, else a
    stack without the API. Module scope, asked of ``_stacks`` each time: a [postgres] test in between
    stops the SQLite stack, and the next module gets it started again rather than a stale address."""
    from types import SimpleNamespace
    from pathlib import Path

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        st = request.getfixturevalue("stack") if os.environ.get("BONN_SWEEP_TEST_STACK_HOME") else _stacks.get("sqlite")
        yield SimpleNamespace(dashboard=st.ray_dashboard_url, mlflow_uri=st.mlflow_uri, home=Path(st.home))
        return
    except Exception as exc:  # noqa: BLE001 - e.g. the API of the shared stack does not start
        print(f"\n[cluster] shared stack unavailable ({type(exc).__name__}: {exc}); starting Ray + MLflow")
    home = tmp_path_factory.mktemp("driver-stack") / "home"
    try:
        st = start_stack(home, num_cpus=2, with_api=False)
        yield SimpleNamespace(dashboard=st.ray_dashboard_url, mlflow_uri=st.mlflow_uri, home=Path(st.home))
    finally:
        stop_stack(home, remove_temp=True, quiet=True)
