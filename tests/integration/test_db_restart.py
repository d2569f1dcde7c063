"""The database restarted mid-sweep, on PostgreSQL: nothing lost or duplicated.

The session's ``postgres`` stack (``start_stack(db_url=...)`` = ``bonn-sweep up --db``) reaches the
shared PostgreSQL server through a TCP proxy the tests own (tests/integration/pg_proxy.py,
``_stacks.proxy``): its three stores (study store, Optuna, MLflow's backend) go through it. Once the first trial has reported, the proxy
drops every connection and refuses new ones for 15 s -- what every client sees while the server
restarts -- then listens again. The shared server itself is never stopped. The sweep pauses
(Optuna's storage calls retry: service/sweep/db_retry.py; MLflow logging goes to the driver's
outbox) and goes on; the study SUCCEEDS and Optuna, the store and MLflow agree, each trial once
(``check_accounting`` of test_faults.py).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import wait_until
from tests.integration.test_faults import api_trials, post, study_spec, succeeded

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.postgres(only=True)]

OUTAGE_S = 15.0


def test_database_restarted_mid_sweep_loses_and_duplicates_nothing(stack, _stacks) -> None:  # noqa: ANN001
    proxy = _stacks.proxy
    assert proxy is not None, "the postgres stack runs behind the session's proxy"
    try:
        n, epochs = 2, 8
        with httpx.Client(base_url=stack.api_url or "", timeout=60,
                          headers={"Authorization": f"Bearer {stack.api_key}"}) as api:
            t0 = time.monotonic()
            sid = post(api, study_spec("db restart", trials=n, epochs=epochs))
            wait_until(lambda: any((t["epochs_done"] or 0) >= 2 for t in api_trials(api, sid)),
                       timeout=240, interval=0.5, what="a trial reporting epochs")
            proxy.stop()
            t_down = time.monotonic()
            print(f"\n[db restart] connections dropped {t_down - t0:.1f}s after POST; down for {OUTAGE_S:.0f}s")
            r = api.get(f"/studies/{sid}", timeout=30)  # the API answers: 503, the store is unreachable
            assert r.status_code == 503 and r.json()["detail"][0]["type"] == "database_unavailable", r.text
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
            proxy.start()
            print(f"[db restart] back after {time.monotonic() - t_down:.1f}s")
            body, _ = succeeded(stack, api, sid, finished=n, epochs=epochs)
            assert body["status"] == "SUCCEEDED"
            print(f"[db restart] SUCCEEDED, nothing lost or duplicated, {time.monotonic() - t0:.1f}s in all")
    finally:
        if proxy._listener is None:
            proxy.start()
