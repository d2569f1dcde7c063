"""Service timings on the embedded stack: stack start-up, POST /studies latency, POST -> first trial
running, and Tune's per-trial overhead relative to the trial's compute time.

    .venv/bin/python benchmarks/bench_service.py                 # starts (and stops) a stack in a tmp home
    .venv/bin/python benchmarks/bench_service.py --api http://127.0.0.1:8000 --mlflow http://127.0.0.1:5000

Definitions
- POST latency: wall time of ``POST /studies`` (validation, store row, MLflow experiment + parent run +
  spec artifacts, Ray job submission), client side; the first POST and the median of the others.
  Validation-only latency: a POST that fails validation (422).
- POST -> first trial running: from sending the POST to the ``datetime_start`` of the study's first
  Optuna trial (the driver creates it when Tune asks the searcher for a config), and to the first
  trial's first reported epoch (MLflow ``val_acc`` timestamp).
- Per-trial overhead: Optuna ``datetime_complete - datetime_start`` (the trial's wall time in Tune)
  minus the sum of its reported ``epoch_time_s`` (pure training time measured by ``fit``); shown
  as seconds and as a ratio to the compute time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUDY: dict[str, Any] = {
    "name": "bench",
    "search_space": "digits-smoke",
    "base": {"epochs": 4},
    "sampler": {"type": "tpe", "seed": 0},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "budget": {"num_trials": 8, "max_concurrent_trials": 2},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
}
TINY = {**STUDY, "name": "bench-post", "base": {"epochs": 1}, "budget": {"num_trials": 1, "max_concurrent_trials": 1}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", help="use a running API instead of starting a stack")
    ap.add_argument("--mlflow", help="MLflow tracking URI of that API's stack (for per-trial compute times)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--posts", type=int, default=5, help="POSTs for the latency median (each cancelled at once)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary home (logs, MLflow, Optuna DBs)")
    args = ap.parse_args()

    results: dict[str, Any] = {}
    stack = None
    if args.api:
        api_url, mlflow_uri = args.api, args.mlflow
    else:
        from service.launch.stack import start_stack

        home = Path(tempfile.mkdtemp(prefix="bsbench-")) / "home"
        t0 = time.monotonic()
        stack = start_stack(home, num_cpus=2)
        results["stack_up_s"] = round(time.monotonic() - t0, 2)
        results["stack_timings"] = stack.timings
        api_url, mlflow_uri = stack.api_url, stack.mlflow_uri
        print(f"stack up in {results['stack_up_s']:.1f}s ({stack.timings})")
    try:
        with httpx.Client(base_url=api_url or "", timeout=120) as api:
            results.update(bench_post(api, args.posts))
            results.update(bench_study(api, mlflow_uri, args.trials, args.epochs))
    finally:
        if stack is not None:
            from service.launch.stack import stop_stack

            t0 = time.monotonic()
            stop_stack(stack, remove_temp=True)
            results["stack_down_s"] = round(time.monotonic() - t0, 2)
            if not args.keep:
                shutil.rmtree(Path(stack.home).parent, ignore_errors=True)
    print()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def bench_post(api: httpx.Client, n: int) -> dict[str, Any]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        r = api.post("/studies", json={**TINY, "name": f"bench-post-{i}"})
        lat.append(time.perf_counter() - t0)
        r.raise_for_status()
        api.post(f"/studies/{r.json()['id']}/cancel")
    t0 = time.perf_counter()
    r = api.post("/studies", json={**TINY, "budget": {"num_trials": 0}})
    bad = time.perf_counter() - t0
    assert r.status_code == 422
    out = {
        "post_first_ms": round(lat[0] * 1000, 1),
        "post_median_ms": round(statistics.median(lat[1:] or lat) * 1000, 1),
        "post_422_ms": round(bad * 1000, 1),
    }
    print(f"POST /studies: first {out['post_first_ms']} ms, median of the next {n - 1}: {out['post_median_ms']} ms; "
          f"a 422: {out['post_422_ms']} ms")
    return out


def bench_study(api: httpx.Client, mlflow_uri: str | None, trials: int, epochs: int) -> dict[str, Any]:
    spec = {**STUDY, "base": {"epochs": epochs}, "budget": {"num_trials": trials, "max_concurrent_trials": 2}}
    # wait until the POST-latency studies are out of the way (they were cancelled)
    time.sleep(2)
    t_post = datetime.now(UTC)
    t0 = time.monotonic()
    body = api.post("/studies", json=spec).json()
    sid = body["id"]
    first_running = None
    while True:
        s = api.get(f"/studies/{sid}").json()
        if first_running is None and (s["trial_counts"]["running"] + s["trial_counts"]["complete"] + s["trial_counts"]["pruned"]) > 0:
            first_running = time.monotonic() - t0
        if s["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.2)
    wall = time.monotonic() - t0
    print(f"study {sid}: {s['status']} in {wall:.1f}s, counts {s['trial_counts']}")
    trials_data = api.get(f"/studies/{sid}/trials").json()["data"]
    starts = [datetime.fromisoformat(t["datetime_start"]) for t in trials_data if t["datetime_start"]]
    out: dict[str, Any] = {
        "study_status": s["status"],
        "study_wall_s": round(wall, 2),
        "trials": len(trials_data),
        "post_to_first_trial_start_s": round((min(starts) - t_post).total_seconds(), 2) if starts else None,
        "post_to_first_trial_seen_running_s": round(first_running, 2) if first_running else None,
    }
    if mlflow_uri:
        out.update(trial_overheads(mlflow_uri, trials_data, t_post))
    print(f"POST -> first Optuna trial "
          f"{out['post_to_first_trial_start_s']} s, -> first epoch reported {out.get('post_to_first_epoch_s')} s")
    if "overhead_ratio_mean" in out:
        print(f"per trial: wall {out['trial_wall_mean_s']} s, compute (sum epoch_time_s) {out['trial_compute_mean_s']} s, "
              f"overhead {out['trial_overhead_mean_s']} s = {out['overhead_ratio_mean']}x compute")
    return out


def trial_overheads(mlflow_uri: str, trials: list[dict[str, Any]], t_post: datetime) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    walls, computes, first_epoch = [], [], []
    for t in trials:
        if not (t["mlflow_run_id"] and t["datetime_start"] and t["datetime_complete"]):
            continue
        hist = client.get_metric_history(t["mlflow_run_id"], "epoch_time_s")
        if not hist:
            continue
        # one value per epoch (a restored trial may re-log a step: keep the last per step)
        per_step = {m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}
        compute = sum(per_step.values())
        wall = (datetime.fromisoformat(t["datetime_complete"]) - datetime.fromisoformat(t["datetime_start"])).total_seconds()
        walls.append(wall)
        computes.append(compute)
        first_epoch.append(min(m.timestamp for m in hist) / 1000)
    if not walls:
        return {}
    overheads = [w - c for w, c in zip(walls, computes, strict=True)]
    return {
        "trials_timed": len(walls),
        "trial_wall_mean_s": round(statistics.mean(walls), 2),
        "trial_compute_mean_s": round(statistics.mean(computes), 3),
        "trial_overhead_mean_s": round(statistics.mean(overheads), 2),
        "overhead_ratio_mean": round(statistics.mean(o / c for o, c in zip(overheads, computes, strict=True) if c > 0), 1),
        "post_to_first_epoch_s": round(min(first_epoch) - t_post.timestamp(), 2),
    }


if __name__ == "__main__":
    sys.exit(main())
