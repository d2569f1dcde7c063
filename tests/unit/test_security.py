"""API keys (401/403), rate limit (429), body size (413), limits (422/429) and StudySpec paths confined
to the data directories -- through TestClient with the stubs of test_api_unit, plus the key helpers
and the CLI's key handling."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.deps import get_jobs, get_tracking
from service.api.security import TokenBucket
from service.api.study_service import submission_id_for
from service.core.auth import KeyRing, ensure_local_key, hash_key, key_id_of, local_key_path, new_key, parse_entries
from service.core.settings import Settings
from service.core.store import ActiveLimitReached, StudyStore
from tests.unit.test_api_unit import SPEC, FakeJobs, FakeTracking

KEY = "env-key-for-tests-0123456789"


def make_client(tmp_path: Path, **overrides: Any) -> tuple[TestClient, FakeJobs, Settings]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    kw: dict[str, Any] = {
        "home": tmp_path / "home", "ray_dashboard_url": "http://127.0.0.1:8265", "driver_python": "/py/bin/python",
        "api_keys": KEY, "data_dirs": [data], "api_key_cache_s": 0,
    }
    kw.update(overrides)
    settings = Settings(**kw)
    app = create_app(settings, reconcile=False, warm_up=False)
    jobs, tracking = FakeJobs(), FakeTracking()
    app.dependency_overrides[get_jobs] = lambda: jobs
    app.dependency_overrides[get_tracking] = lambda: tracking
    return TestClient(app), jobs, settings


@pytest.fixture
def sec(tmp_path: Path) -> Iterator[tuple[TestClient, FakeJobs, Settings]]:
    client, jobs, settings = make_client(tmp_path)
    with client:
        yield client, jobs, settings


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error(r: Any) -> dict[str, Any]:
    detail = r.json()["detail"]
    assert isinstance(detail, list) and all(set(d) == {"loc", "msg", "type"} for d in detail), detail
    return detail[0]


# -- 401 / 403 -----------------------------------------------------------------------------------------


def test_writes_without_key_are_401_with_www_authenticate(sec) -> None:
    client, jobs, _ = sec
    for method, path, body in (
        ("POST", "/studies", SPEC), ("POST", "/studies/x/cancel", None), ("POST", "/studies/x/resume", None),
        ("DELETE", "/studies/x", None),
    ):
        r = client.request(method, path, json=body)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        e = error(r)
        assert e["loc"] == ["header", "Authorization"] and e["type"] == "not_authenticated"
        assert "Bearer" in e["msg"]
    assert jobs.submitted == []


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", KEY])
def test_malformed_authorization_is_401(sec, header: str) -> None:
    client, _, _ = sec
    r = client.post("/studies", json=SPEC, headers={"Authorization": header})
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    assert error(r)["loc"] == ["header", "Authorization"]


def test_wrong_key_is_403_and_right_key_201(sec) -> None:
    client, jobs, _ = sec
    r = client.post("/studies", json=SPEC, headers=auth("not-the-key"))
    assert r.status_code == 403 and error(r)["type"] == "invalid_api_key"
    assert "WWW-Authenticate" not in r.headers
    r = client.post("/studies", json=SPEC, headers=auth())
    assert r.status_code == 201, r.text
    assert len(jobs.submitted) == 1
    # a wrong key is refused also on an open read; no key there is fine
    assert client.get("/studies", headers=auth("nope")).status_code == 403
    assert client.get("/studies").status_code == 200


def test_reads_open_by_default_and_closed_with_auth_reads(tmp_path: Path) -> None:
    client, _, _ = make_client(tmp_path, api_auth_reads=True)
    with client:
        for path in ("/studies", "/studies/x", "/studies/x/trials"):
            r = client.get(path)
            assert r.status_code == 401, path
        assert client.get("/studies", headers=auth()).status_code == 200
        assert client.get("/studies/x", headers=auth()).status_code == 404
        # health and docs stay open
        assert client.get("/healthz").status_code in (200, 503)
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200


def test_store_keys_and_revocation(sec) -> None:
    client, _, settings = sec
    store = client.app.state.store
    key_id, key = new_key()
    store.add_api_key(key_id, hash_key(key), "alice")
    assert client.post("/studies", json=SPEC, headers=auth(key)).status_code == 201
    store.revoke_api_key(key_id)  # api_key_cache_s=0: effective at once
    r = client.post("/studies", json=SPEC, headers=auth(key))
    assert r.status_code == 403 and "revoked" in error(r)["msg"]


def test_sha256_entries_and_keys_file(tmp_path: Path) -> None:
    file_key = "from-a-docker-secret-abcdef012345"
    secret = tmp_path / "secret"
    secret.write_text(f"# keys\n{file_key}\n")
    other = "hashed-in-env-0123456789"
    client, _, _ = make_client(tmp_path, api_keys=f"sha256:{hash_key(other)}", api_keys_file=secret)
    with client:
        assert client.post("/studies", json=SPEC, headers=auth(other)).status_code == 201
        assert client.post("/studies", json=SPEC, headers=auth(file_key)).status_code == 201
        assert client.post("/studies", json=SPEC, headers=auth(f"sha256:{hash_key(other)}")).status_code == 403


def test_no_keys_configured_refuses_every_write(tmp_path: Path) -> None:
    client, jobs, _ = make_client(tmp_path, api_keys=None)
    with client:
        assert client.post("/studies", json=SPEC).status_code == 401
        assert client.post("/studies", json=SPEC, headers=auth()).status_code == 403
        assert client.get("/studies").status_code == 200
    assert jobs.submitted == []


def test_keyring_compares_every_entry_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.core.auth as auth_mod

    entries = parse_entries("a-first-key-123, b-second-key-456, c-third-key-789", source="env")
    calls: list[tuple[bytes, bytes]] = []
    real = auth_mod.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", counting)
    ring = KeyRing(entries)
    assert ring.verify("a-first-key-123") == entries[0]
    assert len(calls) == 3  # no early exit on the first match
    assert ring.verify("nope") is None and len(calls) == 6
    with pytest.raises(ValueError, match="64 hex"):
        parse_entries("sha256:xyz", source="env")


# -- 429 rate limit ------------------------------------------------------------------------------------


def test_rate_limit_per_key_429_with_retry_after(tmp_path: Path) -> None:
    client, _, _ = make_client(tmp_path, api_rate_limit_per_s=0.5, api_rate_limit_burst=3)
    with client:
        codes = [client.get("/studies", headers=auth()).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = client.get("/studies", headers=auth())
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        e = error(r)
        assert e["type"] == "rate_limited" and "0.5 requests/s" in e["msg"] and "API key" in e["msg"]
        # anonymous reads have their own bucket (per client address); /healthz is never limited
        assert client.get("/studies").status_code == 200
        assert all(client.get("/healthz").status_code != 429 for _ in range(5))


def test_token_bucket_refills() -> None:
    b = TokenBucket(rate=2.0, burst=2)
    assert b.take("k", now=0.0) == 0 and b.take("k", now=0.0) == 0
    assert b.take("k", now=0.0) == pytest.approx(0.5)
    assert b.take("k", now=0.5) == 0  # one token back after 0.5 s
    assert b.take("other", now=0.5) == 0
    assert TokenBucket(rate=0, burst=1).take("k") == 0  # off


# -- 413 body size ----------------------------------------------------------------------------------------


def test_body_too_large_is_413(tmp_path: Path) -> None:
    client, jobs, _ = make_client(tmp_path, api_max_body_bytes=2048)
    with client:
        big = {**SPEC, "base": {"epochs": 2}, "name": "x", "search_space": {"description": "y" * 5000}}
        r = client.post("/studies", json=big, headers=auth())
        assert r.status_code == 413
        e = error(r)
        assert e["loc"] == ["body"] and "2048 bytes" in e["msg"] and "BONN_SWEEP_API_MAX_BODY_BYTES" in e["msg"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: read up to the limit, then 413
            yield b'{"name": "x", "search_space": "'
            for _ in range(10):
                yield b"z" * 500
            yield b'"}'

        r = client.post("/studies", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 413
        # a small chunked body goes through to validation
        r = client.post("/studies", content=iter([b'{"name": "x", ', b'"search_space": "nope"}']),
                        headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 422 and "unknown preset" in error(r)["msg"]
    assert jobs.submitted == []


# -- 422 limits and paths -----------------------------------------------------------------------------------


def test_max_trials_per_study(tmp_path: Path) -> None:
    client, jobs, _ = make_client(tmp_path, max_trials_per_study=10)
    with client:
        r = client.post("/studies", json={**SPEC, "budget": {"num_trials": 11}}, headers=auth())
        assert r.status_code == 422
        e = error(r)
        assert e["loc"] == ["body", "budget", "num_trials"] and e["type"] == "limit_exceeded"
        assert "limit of 10 trials" in e["msg"] and "BONN_SWEEP_MAX_TRIALS_PER_STUDY" in e["msg"]
        sid = client.post("/studies", json={**SPEC, "budget": {"num_trials": 10}}, headers=auth()).json()["id"]
        jobs.set(submission_id_for(sid), "STOPPED")
        r = client.post(f"/studies/{sid}/resume", json={"num_trials": 12}, headers=auth())
        assert r.status_code == 422 and error(r)["loc"] == ["body", "num_trials"]
        assert client.post(f"/studies/{sid}/resume", json={"num_trials": 10}, headers=auth()).status_code == 200


def _npz_spec(data_root: str, **extra: Any) -> dict[str, Any]:
    return {**SPEC, "base": {"dataset": "npz", "data_root": data_root}, **extra}


def test_data_root_outside_data_dirs_is_422(tmp_path: Path) -> None:
    client, jobs, settings = make_client(tmp_path)
    data = settings.data_dirs[0]
    outside = tmp_path / "secret"
    outside.mkdir()
    (data / "escape").symlink_to(outside)
    (data / "ok.npz").write_bytes(b"")
    with client:
        cases = {
            "/etc/passwd": "outside the allowed data directories",
            f"{data}/../secret/x.npz": "resolves",
            f"{data}/escape/x.npz": "resolves",
            "relative/x.npz": "absolute path",
        }
        for value, msg in cases.items():
            r = client.post("/studies", json=_npz_spec(value), headers=auth())
            assert r.status_code == 422, (value, r.text)
            e = error(r)
            assert e["loc"] == ["body", "base", "data_root"] and e["type"] == "path_not_allowed", e
            assert msg in e["msg"] and "base.data_root" in e["msg"], e["msg"]
        assert jobs.submitted == []
        for ok in (f"{data}/ok.npz", f"{data}/sub/../ok.npz", f"{data}/not-yet-there.npz"):
            r = client.post("/studies", json=_npz_spec(ok), headers=auth())
            assert r.status_code == 201, (ok, r.text)


def test_data_root_in_search_space_is_checked(tmp_path: Path) -> None:
    client, _, settings = make_client(tmp_path)
    data = settings.data_dirs[0]
    space = {"parameters": {"lam": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
                            "data_root": {"type": "categorical", "choices": [f"{data}/a.npz", "/etc/b.npz"]}},
             "fixed": {"model": "small_cnn", "dataset": "npz"}}
    with client:
        r = client.post("/studies", json={**SPEC, "search_space": space}, headers=auth())
        assert r.status_code == 422, r.text
        assert error(r)["loc"] == ["body", "search_space", "parameters", "data_root", "choices", 1]
        fixed = {"parameters": {"lam": space["parameters"]["lam"]},
                 "fixed": {"model": "small_cnn", "dataset": "npz", "data_root": "/root/x.npz"}}
        r = client.post("/studies", json={**SPEC, "search_space": fixed}, headers=auth())
        assert r.status_code == 422 and error(r)["loc"] == ["body", "search_space", "fixed", "data_root"]


# -- 429 active studies -----------------------------------------------------------------------------------


def test_max_active_studies(tmp_path: Path) -> None:
    client, jobs, _ = make_client(tmp_path, max_active_studies=2)
    with client:
        a = client.post("/studies", json=SPEC, headers={**auth(), "Idempotency-Key": "a"}).json()["id"]
        b = client.post("/studies", json=SPEC, headers=auth()).json()["id"]
        r = client.post("/studies", json=SPEC, headers=auth())
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        e = error(r)
        assert e["loc"] == ["limits", "max_active_studies"] and e["type"] == "too_many_active_studies"
        assert "at most 2" in e["msg"] and "BONN_SWEEP_MAX_ACTIVE_STUDIES" in e["msg"]
        # an idempotent replay creates nothing: answered even at the limit
        r = client.post("/studies", json=SPEC, headers={**auth(), "Idempotency-Key": "a"})
        assert r.status_code == 200 and r.json()["id"] == a
        jobs.set(submission_id_for(b), "STOPPED")  # b ends: a slot frees
        assert client.get(f"/studies/{b}").json()["status"] == "CANCELLED"
        c = client.post("/studies", json=SPEC, headers=auth())
        assert c.status_code == 201
        r = client.post(f"/studies/{b}/resume", headers=auth())  # resuming b would make 3 active
        assert r.status_code == 429 and error(r)["type"] == "too_many_active_studies"
        assert client.get(f"/studies/{b}").json()["status"] == "CANCELLED"
        assert len(jobs.submitted) == 3


def test_store_active_limit_holds_under_concurrent_creates(tmp_path: Path) -> None:
    store = StudyStore(f"sqlite:///{tmp_path}/s.db")
    store.create_all()
    results: list[str] = []

    def create(i: int) -> None:
        try:
            store.create(name=f"s{i}", spec_json="{}", num_trials=1, max_active=3)
            results.append("ok")
        except ActiveLimitReached:
            results.append("limit")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["limit"] * 9 + ["ok"] * 3
    assert store.count_active() == 3
    store.close()


# -- OpenAPI ------------------------------------------------------------------------------------------------


def test_openapi_documents_bearer_auth_and_limits(sec) -> None:
    client, _, _ = sec
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["bearerAuth"]["description"]}
    post = schema["paths"]["/studies"]["post"]
    assert post["security"] == [{"bearerAuth": []}]
    assert {"401", "403", "413", "415", "422", "429"} <= set(post["responses"])
    assert schema["paths"]["/studies"]["get"]["security"] == [{}, {"bearerAuth": []}]  # reads open by default
    assert "security" not in schema["paths"]["/healthz"]["get"]


# -- keys: local key file and CLI -------------------------------------------------------------------------------


def test_ensure_local_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home}/studies.db"
    key = ensure_local_key(home, url)
    path = local_key_path(home)
    assert path.read_text().strip() == key and key_id_of(key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_local_key(home, url) == key  # kept while the store knows it
    store = StudyStore(url)
    row = store.get_api_key(key_id_of(key))
    assert row.sha256 == hash_key(key) and key not in (row.sha256, row.name)  # only the hash is stored
    store.revoke_api_key(row.id)
    store.close()
    new = ensure_local_key(home, url)
    assert new != key and path.read_text().strip() == new
    assert key not in (home / "studies.db").read_bytes().decode("latin-1")


def test_cli_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.launch.cli import main

    home = str(tmp_path / "home")
    assert main(["--home", home, "keys", "create", "--name", "ci"]) == 0
    key = capsys.readouterr().out.strip()
    kid = key_id_of(key)
    assert kid
    assert main(["--home", home, "keys", "list"]) == 0
    out = capsys.readouterr().out
    assert kid in out and "ci" in out and key not in out
    assert main(["--home", home, "keys", "revoke", kid]) == 0
    assert main(["--home", home, "keys", "revoke", "nope"]) == 1
    store = StudyStore(f"sqlite:///{tmp_path}/home/studies.db")
    assert store.get_api_key(kid).revoked_at is not None
    store.close()


def test_cli_sends_local_key_only_to_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from service.launch.api_client import api_key, is_loopback_url

    home = tmp_path / "home"
    home.mkdir()
    key = ensure_local_key(home, f"sqlite:///{home}/studies.db")
    args = argparse.Namespace(home=str(home), api=None)
    monkeypatch.delenv("BONN_SWEEP_API_KEY", raising=False)
    assert api_key(args, "http://127.0.0.1:8000") == key
    assert api_key(args, "http://localhost:8000") == key
    assert api_key(args, "http://[::1]:8000") == key
    assert api_key(args, "http://api.example.org:8000") is None
    monkeypatch.setenv("BONN_SWEEP_API_KEY", "from-env")
    assert api_key(args, "http://api.example.org:8000") == "from-env"
    assert is_loopback_url("http://127.0.0.5:1") and not is_loopback_url("http://10.0.0.1:1")


def test_cli_explains_401(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import httpx

    from service.launch.api_client import Api
    from service.launch.cli_errors import CliError

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers.get("authorization") == "Bearer k1"
        return httpx.Response(403, json={"detail": [{"loc": ["header", "Authorization"], "msg": "bad key", "type": "x"}]})

    api = Api("http://127.0.0.1:9", key="k1")
    api._http = httpx.Client(base_url=api.url, transport=httpx.MockTransport(handler), headers=api._http.headers)
    with pytest.raises(CliError) as ei:
        api.request("GET", "/studies")
    assert ei.value.lines[0] == "HTTP 403: header.Authorization: bad key"
    assert "BONN_SWEEP_API_KEY" in ei.value.lines[1]


# -- found by schemathesis (tests/integration/test_api_schema.py) ------------------------------------------


def test_405_lists_every_method_of_the_path(sec) -> None:
    client, _, _ = sec
    r = client.request("OPTIONS", "/studies", headers=auth())
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"  # Starlette alone says "POST" (first route of the path only)
    assert error(r)["type"] == "method_not_allowed"


def test_non_utf8_json_body_is_422_not_400(sec) -> None:
    client, _, _ = sec
    sid = client.post("/studies", json=SPEC, headers=auth()).json()["id"]
    for path in ("/studies", f"/studies/{sid}/resume"):
        r = client.post(path, content=b'{"name": "\xc3\x28"}', headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert error(r)["type"] == "json_invalid" and "UTF-8" in error(r)["msg"]


def test_huge_offset_is_422_not_5xx(sec) -> None:
    client, _, _ = sec
    assert client.get(f"/studies?offset={2**80}").status_code == 422
    assert client.get(f"/studies?offset={2**31 - 1}").status_code == 200


def test_strict_types_in_the_spec(sec) -> None:
    client, jobs, _ = sec
    for bad in ({"resources": {"gpus_per_trial": False}}, {"budget": {"num_trials": "4"}},
                {"budget": {"num_trials": 4.0}}):
        r = client.post("/studies", json={**SPEC, **bad}, headers=auth())
        assert r.status_code == 422, (bad, r.text)
    r = client.post("/studies", json={**SPEC, "scheduler": {"reduction_factor": 2}}, headers=auth())
    assert r.status_code == 201, r.text  # an integer is a number
    assert len(jobs.submitted) == 1


def test_idempotent_replay_200_is_documented(sec) -> None:
    client, _, _ = sec
    responses = client.get("/openapi.json").json()["paths"]["/studies"]["post"]["responses"]
    assert {"200", "201"} <= set(responses)


def test_huge_numbers_are_422_not_5xx(sec) -> None:
    client, jobs, _ = sec
    for bad in ({"base": {"lr": 10**400}}, {"search_space": {"parameters": {"lam": {"type": "float", "low": 0,
                                                                                   "high": 10**400}}}}):
        r = client.post("/studies", json={**SPEC, **bad}, headers=auth())
        assert r.status_code == 422, (bad, r.text)
    r = client.post("/studies", json={**SPEC, "resources": {"custom": {"x": 1.7976931348623157e308}}}, headers=auth())
    assert r.status_code < 500, r.text  # was an OverflowError (503) in the custom-resource check


def test_new_store_key_works_without_waiting_for_the_cache(tmp_path: Path) -> None:
    import time

    client, _, _ = make_client(tmp_path, api_key_cache_s=600)
    with client:
        assert client.post("/studies/x/cancel", headers=auth()).status_code == 404  # cache loaded
        key_id, key = new_key()
        client.app.state.store.add_api_key(key_id, hash_key(key), "new")
        time.sleep(1.1)  # unknown keys reload the table at most once a second
        assert client.post("/studies/x/cancel", headers=auth(key)).status_code == 404
        client.app.state.store.revoke_api_key(key_id)  # revocation waits for the cache (600 s here)
        assert client.post("/studies/x/cancel", headers=auth(key)).status_code == 404


def test_a_key_created_right_after_a_reload_is_accepted_by_the_next_miss():
    """An unknown key within a second of the last reload waits for the next reload (not a 403)."""
    import time as _time
    from types import SimpleNamespace

    from service.api.security import KeyProvider
    from service.core.auth import hash_key, key_id_of, new_key

    rows: list = []

    class Store:
        def list_api_keys(self, include_revoked=False):
            return list(rows)

    kp = KeyProvider(SimpleNamespace(api_keys=None, api_keys_file=None, api_key_cache_s=5.0), lambda: Store())
    assert kp.ring().verify("bsk_0_x") is None  # loaded now
    key = new_key()[1]
    rows.append(SimpleNamespace(id=key_id_of(key), sha256=hash_key(key), name="new"))
    assert kp.cached() is not None and kp.cached().verify(key) is None  # the cache predates the key
    t0 = _time.monotonic()
    assert kp.refresh_on_miss(min_age_s=0.3).verify(key) is not None
    assert _time.monotonic() - t0 >= 0.25, "a miss right after a reload waits for the next one"
