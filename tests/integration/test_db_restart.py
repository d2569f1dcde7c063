"""The database restarted mid-sweep, on PostgreSQL: nothing lost or duplicated.

The test owns a TCP proxy (tests/integration/pg_proxy.py) in front of the shared PostgreSQL server
and starts a stack whose three stores (study store, Optuna, MLflow's backend) go through it
(``start_stack(db_url=...)`` = ``bonn-sweep up --db``). Once the first trial has reported, the proxy
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

from tests.conftest import PG_SERVER, pg_available, unique_db_name, wait_until
from tests.integration.pg_proxy import TcpProxy
from tests.integration.test_faults import api_trials, post, study_spec, succeeded

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

OUTAGE_S = 15.0


def test_database_restarted_mid_sweep_loses_and_duplicates_nothing(_stacks) -> None:  # noqa: ANN001
    why = pg_available()
    if why:
        pytest.skip(f"PostgreSQL not reachable: {why}")
    from sqlalchemy.engine import make_url

    upstream = make_url(f"{PG_SERVER}/postgres")
    proxy = TcpProxy((upstream.host or "127.0.0.1", upstream.port or 5432)).start()
    db_url = upstream.set(port=proxy.port, database=unique_db_name("bonn_restart")).render_as_string(hide_password=False)
    try:
        stack = _stacks.get("postgres-proxy", db_url=db_url)
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
        _stacks.stop("postgres-proxy") if "postgres-proxy" in _stacks.running else None
        proxy.stop()
