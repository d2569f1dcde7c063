"""Schemathesis against the API's own OpenAPI schema, over real HTTP: no 5xx for any generated input,
and every answer conforms to the schema (status code documented, body matches its model, headers,
content type).

The API runs under uvicorn (in a thread, on a free 127.0.0.1 port) with the real store, Optuna storage,
validation, key check and limits, and with Ray's Jobs API and MLflow replaced by the stubs of the unit
tests, so that the studies the fuzzer creates submit no Ray jobs. The rate limit is off here (the fuzzer
is one fast client) and so is the active-studies limit; both are tested in tests/unit/test_security.py.
Runtime: ``MAX_EXAMPLES`` per operation, well under a minute on 2 cores.

All checks run except ``positive_data_acceptance`` (see the test). The schema is built at collection time from an app with the same security settings (schemathesis'
fixture-based lazy loader does not work with pytest 9); ``test_served_schema_is_the_tested_one``
checks that the server serves exactly that schema.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.api.deps import get_jobs, get_tracking  # noqa: E402
from service.core.settings import Settings  # noqa: E402
from tests.conftest import get_free_port, wait_until  # noqa: E402
from tests.unit.test_api_unit import FakeJobs, FakeTracking  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "schemathesis-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_EXAMPLES = int(os.environ.get("BONN_SWEEP_SCHEMA_EXAMPLES", "60"))


def _settings(home: Path) -> Settings:
    return Settings(home=home, ray_dashboard_url="http://127.0.0.1:8265", driver_python="/py/bin/python",
                    api_keys=KEY, api_rate_limit_per_s=0, max_active_studies=1_000_000)


SCHEMA_DICT = create_app(_settings(Path("/nonexistent/bonn-sweep-schema"))).openapi()
schema = schemathesis.openapi.from_dict(SCHEMA_DICT)


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    app = create_app(_settings(tmp_path_factory.mktemp("schema") / "home"), reconcile=False, warm_up=False)
    jobs, tracking = FakeJobs(), FakeTracking()
    app.dependency_overrides[get_jobs] = lambda: jobs
    app.dependency_overrides[get_tracking] = lambda: tracking
    port = get_free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-schemathesis", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200, timeout=30,
                   what="the in-thread API")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def test_served_schema_is_the_tested_one(api_server: str) -> None:
    assert httpx.get(f"{api_server}/openapi.json", timeout=10).json() == SCHEMA_DICT


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case, api_server: str) -> None:  # noqa: ANN001
    # Every check but positive_data_acceptance ("a schema-valid body gets a 2xx"): the API validates
    # beyond what JSON Schema can say (preset names, the search-space schema, the trial config a trial
    # would receive, Ray's resource rules), each with a located 422 -- by design.
    case.call_and_validate(base_url=api_server, headers=AUTH,
                           excluded_checks=[schemathesis.checks.positive_data_acceptance])


def test_schema_fuzz_stays_fast(api_server: str) -> None:
    """A smoke check that the server the fuzzer used still answers (and did not wedge)."""
    t0 = time.monotonic()
    assert httpx.get(f"{api_server}/healthz", timeout=10).status_code in (200, 503)
    assert httpx.get(f"{api_server}/studies", headers=AUTH, timeout=10).status_code == 200
    assert time.monotonic() - t0 < 5
