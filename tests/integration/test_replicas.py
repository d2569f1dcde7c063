"""Two API processes behind one database: the limits hold across them and an Idempotency-Key makes one
study, however the concurrent POSTs are spread over the two.

Two extra uvicorn processes of the API run on the session's PostgreSQL stack (its Ray head, MLflow
server and databases; SQLite shared by several engines is covered by tests/unit/test_shared_limits.py,
and this test passed on the SQLite stack as well when it was written), both with
``max_active_studies=2`` and a small rate limit. Requests alternate between them from threads:

* 8 concurrent POSTs with one Idempotency-Key: one study in the store, every answer names it;
* 6 concurrent POSTs of distinct studies with one slot left: exactly one 201, five 429;
* 40 GETs with a fresh key, alternating: the 200s stay within the one shared bucket (burst + refill),
  not one bucket per process.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.core.auth import hash_key, new_key
from service.core.store import StudyStore
from service.launch.processes import http_ok, spawn, stop_proc, wait_healthy
from service.launch.stack_record import REPO_ROOT, Stack, server_env
from tests.conftest import get_free_port
from tests.integration.conftest import wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.postgres(only=True)]

RATE, BURST = 0.5, 8
SPEC = {
    "name": "replicas",
    "search_space": "digits-smoke",
    "base": {"epochs": 3},
    "budget": {"num_trials": 4, "max_concurrent_trials": 1},
}


@pytest.fixture
def replicas(stack: Stack, tmp_path: Path) -> Iterator[list[str]]:
    env = server_env(base={**server_env(), **stack.env()})
    env.pop("BONN_SWEEP_API_KEY", None)
    env.update({"BONN_SWEEP_MAX_ACTIVE_STUDIES": "2", "BONN_SWEEP_API_RATE_LIMIT_PER_S": str(RATE),
                "BONN_SWEEP_API_RATE_LIMIT_BURST": str(BURST), "BONN_SWEEP_RECONCILE_INTERVAL_S": "1"})
    procs, urls = [], []
    try:
        for i in range(2):
            port = get_free_port()
            cmd = [sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory",
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
            proc, popen = spawn(f"api-replica{i}", cmd, tmp_path / f"api{i}.log", env, cwd=REPO_ROOT)
            procs.append(proc)
            wait_healthy(f"API replica {i}", http_ok(f"http://127.0.0.1:{port}/healthz"), proc, popen, 60)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for p in procs:
            stop_proc(p, grace_s=15)


def _post(url: str, key: str, body: dict, idem: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **({"Idempotency-Key": idem} if idem else {})}
    return httpx.post(f"{url}/studies", json=body, headers=headers, timeout=60)


def test_two_api_processes_share_limits_and_idempotency(stack: Stack, replicas: list[str]) -> None:
    store = StudyStore(stack.settings.store_url or "")

    def mk_key(name: str) -> str:  # a bucket of its own for each step
        key_id, key = new_key()
        store.add_api_key(key_id, hash_key(key), name)
        return key

    key = mk_key("replicas-admin")
    created: set[str] = set()
    try:
        # one slot may already be taken by an earlier test's study: wait until none is active
        for row in store.active():
            httpx.post(f"{replicas[0]}/studies/{row.id}/cancel", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        for row in store.active():
            wait_for_status(httpx.Client(base_url=replicas[0], timeout=30, headers={"Authorization": f"Bearer {key}"}), row.id,
                            {"CANCELLED", "SUCCEEDED", "FAILED", "INTERRUPTED"}, timeout=120)

        # 1. one Idempotency-Key, 8 concurrent POSTs over both processes: one study
        idem = f"replicas-{time.time_ns()}"
        with ThreadPoolExecutor(8) as pool:
            k1 = mk_key("replicas-idem")
            rs = list(pool.map(lambda i: _post(replicas[i % 2], k1, SPEC, idem), range(8)))
        assert all(r.status_code in (200, 201) for r in rs), [(r.status_code, r.text[:200]) for r in rs]
        ids = {r.json()["id"] for r in rs}
        assert len(ids) == 1, ids
        assert Counter(r.status_code for r in rs)[201] == 1, [r.status_code for r in rs]
        created |= ids
        with store.engine.connect() as conn:
            from sqlalchemy import text

            n = conn.execute(text("SELECT count(*) FROM studies WHERE idempotency_key = :k"), {"k": idem}).scalar()
        assert n == 1

        # 2. one slot left (max_active_studies=2), 6 concurrent distinct POSTs over both: one 201
        with ThreadPoolExecutor(6) as pool:
            k2 = mk_key("replicas-active")
            rs = list(pool.map(lambda i: _post(replicas[i % 2], k2, {**SPEC, "name": f"replicas-{i}"}), range(6)))
        codes = Counter(r.status_code for r in rs)
        assert codes == {201: 1, 429: 5}, [(r.status_code, r.text[:200]) for r in rs]
        assert all(r.json()["detail"][0]["type"] == "too_many_active_studies" for r in rs if r.status_code == 429)
        created |= {r.json()["id"] for r in rs if r.status_code == 201}
        assert len(store.active()) <= 2

        # 3. a fresh key, 40 GETs alternating over both: one shared bucket
        fresh = mk_key("replicas-rate")
        auth = {"Authorization": f"Bearer {fresh}"}
        t0 = time.monotonic()
        ok = 0
        for i in range(40):
            r = httpx.get(f"{replicas[i % 2]}/studies", headers=auth, timeout=30)
            assert r.status_code in (200, 429), r.text
            ok += r.status_code == 200
        elapsed = time.monotonic() - t0
        allowed = BURST + RATE * elapsed + 1
        assert BURST <= ok <= allowed, f"{ok} requests passed in {elapsed:.1f}s; one shared bucket allows {allowed:.0f}"
    finally:
        for sid in created:
            httpx.post(f"{replicas[0]}/studies/{sid}/cancel", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        with httpx.Client(base_url=replicas[0], timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
            for sid in created:
                wait_for_status(c, sid, {"CANCELLED", "SUCCEEDED", "FAILED", "INTERRUPTED"}, timeout=180)
        store.close()
