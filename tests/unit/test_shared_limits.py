"""Limits kept in the study store, so API processes sharing a database share them: the active-study
count (one row lock around count and insert), the rate-limit buckets (one upsert per take), the
Idempotency-Key; and the key that created a study, with reads limited to a key's own studies when
``api_reads_own_studies`` is on. Separate StudyStore engines stand in for separate processes here;
tests/integration/test_replicas.py runs two real API processes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.core.auth import hash_key, new_key
from service.core.store import ActiveLimitReached, StudyStore
from tests.unit.test_api_unit import SPEC
from tests.unit.test_security import KEY, auth, make_client


def _stores(url: str, n: int) -> list[StudyStore]:
    first = StudyStore(url)
    first.migrate()
    return [first] + [StudyStore(url) for _ in range(n - 1)]


def test_active_limit_holds_across_engines(db_url: str) -> None:
    stores = _stores(db_url, 4)

    def create(i: int) -> str:
        try:
            stores[i % 4].create(name=f"s{i}", spec_json="{}", num_trials=1, max_active=3)
            return "created"
        except ActiveLimitReached:
            return "limited"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(12)))
    assert results.count("created") == 3, results
    assert stores[0].count_active() == 3
    for s in stores:
        s.close()


def test_one_study_per_idempotency_key_across_engines(db_url: str) -> None:
    stores = _stores(db_url, 4)
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda i: stores[i % 4].create(
            name="x", spec_json="{}", num_trials=1, idempotency_key="same", request_hash="h", max_active=10), range(8)))
    assert len({row.id for row, _ in out}) == 1 and sum(created for _, created in out) == 1
    assert stores[0].list()[1] == 1
    for s in stores:
        s.close()


def test_token_bucket_in_the_store_is_shared(db_url: str) -> None:
    stores = _stores(db_url, 2)
    now = 1_000_000.0
    with ThreadPoolExecutor(8) as pool:
        waits = list(pool.map(lambda i: stores[i % 2].take_token("key:a", 1.0, 5, now), range(20)))
    assert sum(w == 0.0 for w in waits) == 5, waits
    assert all(0.0 < w <= 1.0 for w in waits if w)
    assert stores[1].take_token("key:a", 1.0, 5, now + 2.0) == 0.0  # refilled: 2 tokens back
    assert stores[0].take_token("key:b", 1.0, 5, now) == 0.0  # another name, another bucket
    for s in stores:
        s.close()


def test_two_apps_on_one_store_share_the_rate_limit(tmp_path: Path) -> None:
    a, _, _ = make_client(tmp_path, api_rate_limit_per_s=0.1, api_rate_limit_burst=4)
    b, _, _ = make_client(tmp_path, api_rate_limit_per_s=0.1, api_rate_limit_burst=4)
    with a, b:
        codes = [(a if i % 2 else b).get("/studies", headers=auth()).status_code for i in range(8)]
    assert codes.count(200) == 4 and codes[4:] == [429] * 4, codes


def _alice_and_bob(store: StudyStore) -> dict[str, tuple[str, str]]:
    """Two store keys: name -> (key id, key)."""
    keys = {}
    for name in ("alice", "bob"):
        key_id, key = new_key()
        store.add_api_key(key_id, hash_key(key), name)
        keys[name] = (key_id, key)
    return keys


def test_study_records_its_key_and_reads_are_limited_to_own_studies(tmp_path: Path) -> None:
    client, _, settings = make_client(tmp_path, api_reads_own_studies=True)
    with client:
        store = StudyStore(settings.store_url or "")
        keys = _alice_and_bob(store)
        ids = {}
        for name, (key_id, key) in keys.items():
            r = client.post("/studies", json={**SPEC, "name": name}, headers=auth(key))
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
            assert store.get(ids[name]).api_key_id == key_id
        alice = auth(keys["alice"][1])
        listed = client.get("/studies", headers=alice).json()
        assert [s["id"] for s in listed["data"]] == [ids["alice"]] and listed["count"] == 1
        assert client.get(f"/studies/{ids['bob']}", headers=alice).status_code == 404
        assert client.post(f"/studies/{ids['bob']}/cancel", headers=alice).status_code == 404
        assert client.get(f"/studies/{ids['alice']}", headers=alice).status_code == 200
        assert client.get("/studies").status_code == 401  # reads need a key now
        assert client.get("/studies", headers=auth(KEY)).json()["count"] == 2  # the operator's key sees all
        store.close()


def test_without_the_setting_every_key_reads_every_study(tmp_path: Path) -> None:
    client, _, settings = make_client(tmp_path)
    with client:
        store = StudyStore(settings.store_url or "")
        key_id, key = new_key()
        store.add_api_key(key_id, hash_key(key), "carol")
        assert client.post("/studies", json=SPEC, headers=auth(KEY)).status_code == 201
        assert client.get("/studies", headers=auth(key)).json()["count"] == 1
        assert client.get("/studies").status_code == 200
        store.close()


def test_an_idempotency_key_replayed_by_another_key_is_a_conflict_even_in_a_race(tmp_path: Path) -> None:
    """With reads limited to own studies, the owner is part of the request hash: the store itself refuses
    another key's replay (not only the service's pre-check, which a concurrent request can slip past)."""
    from service.api.study_service import request_hash
    from service.core.spec import StudySpec
    from service.core.store import IdempotencyConflict

    client, _, settings = make_client(tmp_path, api_reads_own_studies=True)
    with client:
        store = StudyStore(settings.store_url or "")
        keys = _alice_and_bob(store)
        headers = {"Idempotency-Key": "shared-key"}
        r = client.post("/studies", json=SPEC, headers={**auth(keys["alice"][1]), **headers})
        assert r.status_code == 201, r.text
        assert client.post("/studies", json=SPEC, headers={**auth(keys["alice"][1]), **headers}).status_code == 200
        r = client.post("/studies", json=SPEC, headers={**auth(keys["bob"][1]), **headers})
        assert r.status_code == 409, r.text
        # the race: bob's request reached the store's insert before alice's row was visible to its pre-check
        spec = StudySpec.model_validate(SPEC)
        assert request_hash(spec, owner=keys["alice"][0]) != request_hash(spec, owner=keys["bob"][0])
        with pytest.raises(IdempotencyConflict):
            store.create(name="x", spec_json=spec.canonical_json(), num_trials=1, idempotency_key="shared-key",
                         request_hash=request_hash(spec, owner=keys["bob"][0]))
        assert client.get("/studies", headers=auth(KEY)).json()["count"] == 1
        store.close()


def test_the_shared_bucket_refuses_locally_first_without_a_database_write() -> None:
    from service.api.security import SharedBucket

    class Store:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), 0

        def take_token(self, name, rate, burst, now):
            self.calls += 1
            return self.answers.pop(0)

    store = Store([0.0, 0.0])
    bucket = SharedBucket(0.001, 2, lambda: store)
    assert [bucket.take("key:a") for _ in range(2)] == [0.0, 0.0] and store.calls == 2
    assert bucket.take("key:a") > 0 and store.calls == 2, "the local bucket is empty: no database call"
    # refused by the shared count (other processes spent it): the local token is given back
    other = Store([5.0, 0.0])
    b2 = SharedBucket(0.001, 1, lambda: other)
    assert b2.take("key:b") == 5.0
    assert b2.take("key:b") == 0.0 and other.calls == 2
