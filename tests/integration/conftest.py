"""Real-stack fixtures: a Ray head, an MLflow server and the API (uvicorn), started by
:func:`service.launch.stack.start_stack` in a temporary home on free ports, stopped by pid at the end.

``stack`` (session scope) exposes ``.api_url``, ``.ray_dashboard_url``, ``.ray_address`` (GCS address
for ``ray.init(address=...)``), ``.mlflow_uri``, ``.home`` (str; ``.home_path`` a Path), ``.settings``
(a :class:`service.core.settings.Settings` for this stack), ``.env()`` (environment variables pointing
at it, ``BONN_SWEEP_API_KEY`` included) and ``.api_key`` (the key :func:`start_stack` wrote to
``{home}/api-key``; the ``api`` client sends it). The stack is stopped even when tests fail; a
watchdog process stops it if pytest itself is killed. Set ``BONN_SWEEP_TEST_STACK_HOME`` to reuse a stack started with ``bonn-sweep up`` (or a
previous run) in that home: it is then started if needed and left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from service.launch.stack import start_stack, stop_stack
from service.launch.stack_record import Stack
from service.launch.watchdog import spawn_watchdog
from tests.conftest import wait_until


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reuse = os.environ.get("BONN_SWEEP_TEST_STACK_HOME")
    if reuse:
        yield start_stack(reuse, num_cpus=2, with_api=True)
        return
    home = tmp_path_factory.mktemp("stack") / "home"
    watchdog = None
    s = None
    try:
        watchdog = spawn_watchdog(home)
        t0 = time.monotonic()
        s = start_stack(home, num_cpus=2, with_api=True)
        print(f"\n[stack] up in {time.monotonic() - t0:.1f}s: api {s.api_url}, ray {s.ray_dashboard_url}, mlflow {s.mlflow_uri}")
        yield s
    finally:
        stop_stack(home, remove_temp=True, quiet=True)
        if watchdog is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(watchdog.pid, signal.SIGTERM)
            watchdog.wait(timeout=10)


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


@pytest.fixture(scope="session")
def cluster(request, tmp_path_factory):
    """Ray head + MLflow server for driver-level tests: the session ``stack`` when it starts, else a
    stack without the API."""
    from types import SimpleNamespace
    from pathlib import Path

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        st = request.getfixturevalue("stack")
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
