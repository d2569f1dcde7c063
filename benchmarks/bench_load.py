"""Load on the API: many concurrent GET /studies/{id}, concurrent POST /studies with and without
Idempotency-Key; p50/p99 latency per request kind, and a check that no study was lost or created twice.

    .venv/bin/python benchmarks/bench_load.py                       # starts its own stack in a temp home
    .venv/bin/python benchmarks/bench_load.py --api URL --api-key K # against a running stack (creates studies!)
    .venv/bin/python benchmarks/bench_load.py --db postgresql://postgres@127.0.0.1:5432/bench  # stores on Postgres
    .venv/bin/python benchmarks/bench_load.py --shared-rate-limit   # every request takes a token in the store

``--db`` starts the stack on that PostgreSQL server (``bonn-sweep up --db``: databases <prefix>_studies,
_optuna, _mlflow, dropped at the end). ``--shared-rate-limit`` keeps the rate limit on but too high to
refuse anything, so every request pays for its token upsert in the store (the default of a real
deployment); without it the limit is off, as before.

Its own stack (``service.launch.stack.start_stack`` in a temporary home, stopped by pid at the end) runs with
``BONN_SWEEP_DRIVER_NUM_CPUS=1000``: every study's Ray job asks for more CPUs than the cluster has, so
Ray keeps it queued (PENDING) and no trial ever starts -- the POSTs do all their real work (validation,
store, MLflow experiment + parent run, Ray job submission) without launching 100 sweeps. The rate limit
and the active-studies limit are lifted for the run (``BONN_SWEEP_API_RATE_LIMIT_PER_S=0``,
``BONN_SWEEP_MAX_ACTIVE_STUDIES``). At the end every study the run created is cancelled.

Checks (exit 1 if one fails): no 5xx; every 201 id is listed by GET /studies exactly once; the rows of
this run are exactly the ids answered; each Idempotency-Key yields one study however often and however
concurrently it was sent (one 201, the other answers 200 with the same id).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC: dict[str, Any] = {
    "search_space": "digits-smoke",
    "base": {"epochs": 2},
    "budget": {"num_trials": 2, "max_concurrent_trials": 1},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


class Recorder:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, Counter] = defaultdict(Counter)
        self.wall: dict[str, float] = {}

    async def call(self, kind: str, client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> httpx.Response:
        t0 = time.perf_counter()
        try:
            r = await client.request(method, path, **kw)
        except httpx.TransportError as exc:  # counted, and reported as a problem
            self.codes[kind][type(exc).__name__] += 1
            return httpx.Response(599, json={"detail": [{"loc": [], "msg": repr(exc), "type": "transport"}]})
        self.lat[kind].append((time.perf_counter() - t0) * 1000)
        self.codes[kind][r.status_code] += 1
        return r

    def table(self) -> str:
        head = f"{'request':34s} {'n':>5s} {'conc':>4s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'req/s':>7s}  codes"
        lines = [head, "-" * len(head)]
        for kind, lat in self.lat.items():
            conc = kind.split("@")[-1] if "@" in kind else ""
            name = kind.split("@")[0]
            rps = len(lat) / self.wall[kind] if self.wall.get(kind) else float("nan")
            codes = " ".join(f"{c}x{n}" for c, n in sorted(self.codes[kind].items(), key=str))
            lines.append(f"{name:34s} {len(lat):5d} {conc:>4s} {statistics.median(lat):8.1f} {pct(lat, 99):8.1f} "
                         f"{max(lat):8.1f} {rps:7.1f}  {codes}")
        return "\n".join(lines)


async def bounded(n: int, coros: list) -> list:
    sem = asyncio.Semaphore(n)

    async def run(c):  # noqa: ANN001, ANN202
        async with sem:
            return await c

    return await asyncio.gather(*(run(c) for c in coros))


async def run_load(url: str, key: str, args: argparse.Namespace) -> tuple[Recorder, list[str]]:
    rec = Recorder()
    tag = secrets.token_hex(3)
    headers = {"Authorization": f"Bearer {key}"}
    # keep-alive shorter than uvicorn's 5 s: no reuse of a connection the server is closing
    limits = httpx.Limits(max_connections=max(args.get_concurrency, args.post_concurrency) + 4, keepalive_expiry=2.0)
    problems: list[str] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        # seed: a few studies to read
        seed_ids = []
        for i in range(3):
            r = await client.post("/studies", json={**SPEC, "name": f"load-{tag}-seed-{i}"})
            if r.status_code != 201:
                raise SystemExit(f"seed POST failed: {r.status_code} {r.text[:500]}")
            seed_ids.append(r.json()["id"])

        # 1. concurrent reads
        kind = f"GET /studies/{{id}}@{args.get_concurrency}"
        t0 = time.perf_counter()
        await bounded(args.get_concurrency, [
            rec.call(kind, client, "GET", f"/studies/{random.choice(seed_ids)}") for _ in range(args.gets)])
        rec.wall[kind] = time.perf_counter() - t0

        # 2. concurrent creates without Idempotency-Key
        kind = f"POST /studies@{args.post_concurrency}"
        t0 = time.perf_counter()
        plain = await bounded(args.post_concurrency, [
            rec.call(kind, client, "POST", "/studies", json={**SPEC, "name": f"load-{tag}-plain"})
            for _ in range(args.posts)])
        rec.wall[kind] = time.perf_counter() - t0

        # 3. concurrent creates with Idempotency-Key: each key sent `repeats` times, all interleaved
        kind = f"POST /studies + Idempotency-Key@{args.post_concurrency}"
        calls = [(k, rep) for k in range(args.idem_keys) for rep in range(args.repeats)]
        random.shuffle(calls)
        t0 = time.perf_counter()
        idem = await bounded(args.post_concurrency, [
            rec.call(kind, client, "POST", "/studies", json={**SPEC, "name": f"load-{tag}-idem-{k}"},
                     headers={"Idempotency-Key": f"load-{tag}-{k}"})
            for k, _ in calls])
        rec.wall[kind] = time.perf_counter() - t0

        # -- checks ------------------------------------------------------------------------------------
        for kind, codes in rec.codes.items():
            bad = {c: n for c, n in codes.items() if not isinstance(c, int) or c >= 500}
            if bad:
                problems.append(f"{kind}: server or transport errors {bad}")
        created = set(seed_ids)
        plain_ids = [r.json()["id"] for r in plain if r.status_code == 201]
        if len(plain_ids) != args.posts:
            problems.append(f"plain POSTs: {len(plain_ids)} of {args.posts} answered 201 "
                            f"({Counter(r.status_code for r in plain)})")
        if len(set(plain_ids)) != len(plain_ids):
            problems.append("plain POSTs: an id was answered twice")
        created |= set(plain_ids)
        by_key: dict[int, set[str]] = defaultdict(set)
        first: Counter = Counter()
        for (k, _), r in zip(calls, idem, strict=True):
            if r.status_code in (200, 201):
                by_key[k].add(r.json()["id"])
                first[k] += r.status_code == 201
            else:
                problems.append(f"idempotent POST key {k}: HTTP {r.status_code} {r.text[:200]}")
        for k in range(args.idem_keys):
            if len(by_key[k]) != 1:
                problems.append(f"Idempotency-Key {k}: {len(by_key[k])} distinct studies {sorted(by_key[k])}")
            if first[k] != 1:
                problems.append(f"Idempotency-Key {k}: {first[k]} answers were 201 (expected exactly one)")
        idem_ids = {i for ids in by_key.values() for i in ids}
        created |= idem_ids

        # every study of this run, as the API lists them (paged)
        listed: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = (await client.get("/studies", params={"limit": 500, "offset": offset})).json()
            listed += page["data"]
            offset += len(page["data"])
            if not page["data"] or offset >= page["count"]:
                break
        mine = [s for s in listed if s["name"].startswith(f"load-{tag}-")]
        listed_ids = Counter(s["id"] for s in mine)
        dup = [i for i, n in listed_ids.items() if n > 1]
        lost = created - set(listed_ids)
        extra = set(listed_ids) - created
        names = Counter(s["name"] for s in mine)
        twice = [n for n, c in names.items() if "-idem-" in n and c != 1]
        if dup:
            problems.append(f"listed twice: {dup}")
        if lost:
            problems.append(f"lost (answered but not listed): {sorted(lost)}")
        if extra:
            problems.append(f"created but never answered: {sorted(extra)}")
        if twice:
            problems.append(f"idempotent studies created more than once: {twice}")
        expected = len(seed_ids) + args.posts + args.idem_keys
        print(f"\nstudies of this run: {len(listed_ids)} listed, {len(created)} distinct ids answered, "
              f"{expected} expected ({len(seed_ids)} seed + {args.posts} plain + {args.idem_keys} idempotent keys "
              f"x {args.repeats} sends)")
        if len(listed_ids) != expected:
            problems.append(f"{len(listed_ids)} studies listed, expected {expected}")
        states = Counter(s["status"] for s in mine)
        print(f"statuses: {dict(states)}")

        if not args.keep:
            t0 = time.perf_counter()
            kind = "POST /studies/{id}/cancel@8"
            await bounded(8, [rec.call(kind, client, "POST", f"/studies/{sid}/cancel") for sid in listed_ids])
            rec.wall[kind] = time.perf_counter() - t0
    return rec, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", help="URL of a running API (default: start a stack in a temporary home)")
    p.add_argument("--api-key", default=os.environ.get("BONN_SWEEP_API_KEY"), help="default: BONN_SWEEP_API_KEY")
    p.add_argument("--gets", type=int, default=2000)
    p.add_argument("--get-concurrency", type=int, default=32)
    p.add_argument("--posts", type=int, default=60)
    p.add_argument("--idem-keys", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="sends per Idempotency-Key")
    p.add_argument("--post-concurrency", type=int, default=16)
    p.add_argument("--keep", action="store_true", help="do not cancel the studies at the end")
    p.add_argument("--db", default=None, help="postgresql:// URL: the stack's three stores on that server")
    p.add_argument("--shared-rate-limit", action="store_true",
                   help="rate limit on (1e6/s): each request takes a token from the store's bucket")
    args = p.parse_args(argv)

    stack = home = None
    url, key = args.api, args.api_key
    if url is None:
        from service.launch.stack import start_stack

        home = Path(tempfile.mkdtemp(prefix="bench-load-")) / "home"
        t0 = time.monotonic()
        stack = start_stack(home, num_cpus=2, with_api=True, db_url=args.db, extra_env={
            "BONN_SWEEP_DRIVER_NUM_CPUS": "1000",  # every job stays queued in Ray: no trial runs
            "BONN_SWEEP_API_RATE_LIMIT_PER_S": "1000000" if args.shared_rate_limit else "0",
            "BONN_SWEEP_API_RATE_LIMIT_BURST": "1000000",
            "BONN_SWEEP_MAX_ACTIVE_STUDIES": "100000",
        })
        url, key = stack.api_url, stack.api_key
        print(f"stack up in {time.monotonic() - t0:.1f}s (home {home}; api {url})")
    elif not key:
        print("--api-key (or BONN_SWEEP_API_KEY) is required with --api", file=sys.stderr)
        return 2
    try:
        t0 = time.monotonic()
        rec, problems = asyncio.run(run_load(url or "", key or "", args))
        print(f"\nload phase {time.monotonic() - t0:.1f}s; API {url}\n")
        print(rec.table())
    finally:
        if stack is not None and home is not None:
            from service.launch.stack import stop_stack

            stopped = stop_stack(home, remove_temp=True, quiet=True)
            print(f"\nstopped: {', '.join(stopped)}")
            if args.db and not args.keep:
                from service.core.db import derive_urls, drop_databases

                drop_databases(derive_urls(args.db))
            if not args.keep:
                import shutil

                shutil.rmtree(home.parent, ignore_errors=True)
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    print("\nchecks: no 5xx, no study lost, none listed twice, one study per Idempotency-Key: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
