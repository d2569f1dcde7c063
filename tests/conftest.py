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
