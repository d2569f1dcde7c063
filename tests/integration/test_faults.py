"""Fault tolerance with real processes: the session stack (a local Ray head, an MLflow server on SQLite,
the API under uvicorn), real digits trainings, faults made by killing real processes by pid.

1. The study driver is SIGKILLed mid-sweep: the study is INTERRUPTED (not FAILED), and ``resume``
   finishes it from the Tune state and the Optuna study: trials that finished after the last saved
   Tune state are not run again, trials the kill cut off end as FAIL/cancelled (Optuna) and
   KILLED/cancelled (MLflow) and are replaced, so the study ends with exactly ``num_trials`` finished.
2. The API is SIGKILLed twice mid-sweep and started again on the same port and home: the sweep does
   not notice; the restarted API's statuses catch up, also with a job that ended while it was down
   (its background reconcile, not a GET, moves the row to SUCCEEDED).
3. A trial's worker process (the Tune trial actor; its pid from the trial's own results) is
   SIGKILLed mid-trial: Tune retries it (``FailureConfig(max_failures=2)``) from its last checkpoint
   -- resumed, not restarted -- and its MLflow run holds every epoch once, in one run.
4. A configuration that diverges (lr=1e6: NaN loss, ``trainables.TrainingDiverged``) ends as an
   error with its reason in MLflow (tags ``error_reason``, ``error``) and in the API (the trial's
   ``error``); the study goes on and the other trials complete.
5. The MLflow server is SIGKILLed for 30 s mid-sweep and started again on the same port and backend
   store: every epoch, checkpoint and run end reported meanwhile reaches MLflow once it is back.

Each test ends with every trial accounted for: :func:`check_accounting` (Optuna, API and MLflow agree;
one MLflow run per Tune trial, each epoch once).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")
pytest.importorskip("ray.job_submission")

from mlflow import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from service.launch.stack_record import Stack  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.integration.conftest import wait_for_status  # noqa: E402
from tests.integration.driver_jobs import epochs_by_trial, kill_pid  # noqa: E402

FINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"}
DIGITS = {"lam": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
          "theta": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
          "nu": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}}


def study_spec(name: str, *, trials: int, epochs: int, batch_size: int = 32, space: Any = "digits-smoke",
               max_failed: int = 1) -> dict:
    return {
        "name": name,
        "search_space": space,
        "base": {"epochs": epochs, "batch_size": batch_size, "hist_epochs": [], "device": "cpu"},
        "objective": {"metric": "val_acc", "mode": "max"},
        "sampler": {"type": "tpe", "seed": 0},
        "scheduler": {"type": "fifo"},
        "budget": {"num_trials": trials, "max_concurrent_trials": 2, "max_failed_trials": max_failed},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
        "checkpoints": {"upload": "all"},  # every epoch in MLflow: these tests check each one arrives once
    }


def post(api: httpx.Client, spec: dict) -> str:
    r = api.post("/studies", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def jobs_of(stack: Stack) -> JobSubmissionClient:
    return JobSubmissionClient(stack.ray_dashboard_url)


def api_trials(api: httpx.Client, sid: str) -> list[dict]:
    return api.get(f"/studies/{sid}/trials").json()["data"]


def optuna_trials(stack: Stack, sid: str) -> list:
    return optuna.load_study(study_name=sid, storage=stack.settings.optuna_storage).get_trials()


def child_runs(client: MlflowClient, body: dict) -> list:
    return client.search_runs([body["mlflow_experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{body['mlflow_parent_run_id']}'",
                              max_results=1000)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def succeeded(stack: Stack, api: httpx.Client, sid: str, *markers: str, finished: int, epochs: int,
              errored: int = 0) -> tuple[dict, str]:
    """Wait for the study to end; it must have SUCCEEDED, its driver log must hold every marker, and
    every trial must be accounted for (:func:`check_accounting`). Returns (the study, the driver log)."""
    body = wait_for_status(api, sid, FINAL, timeout=300)
    logs = jobs_of(stack).get_job_logs(body["submission_id"])
    assert body["status"] == "SUCCEEDED", (body.get("error"), logs[-5000:])
    for m in markers:
        assert m in logs, (m, logs[-5000:])
    return check_accounting(stack, api, sid, finished=finished, epochs=epochs, errored=errored), logs


def check_accounting(stack: Stack, api: httpx.Client, sid: str, *, finished: int, epochs: int,
                     errored: int = 0) -> dict:
    """Every trial accounted for, and the three sources agree:

    * Optuna: ``finished`` COMPLETE trials and ``errored`` FAIL ones with ``stop_reason=error``; any
      other FAIL is an orphan of a killed driver (``stop_reason=cancelled``); nothing RUNNING;
    * the API: the same trials (number, state, value, MLflow run), counts and best trial;
    * MLflow: one child run per Tune trial, never two; a COMPLETE trial's run is FINISHED/completed,
      is the one Optuna names, has each epoch 1..epochs exactly once, its last val_acc is Optuna's
      value and a checkpoint per epoch; an errored trial's run is FAILED/error; an orphan's (if it got
      one) KILLED/cancelled; no run without an Optuna trial.
    """
    body = api.get(f"/studies/{sid}").json()
    trials = optuna_trials(stack, sid)
    states = collections.Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == finished, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING], states
    errors = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("stop_reason") == "error"]
    orphans = [t for t in trials if t.state == TrialState.FAIL and t not in errors]
    assert len(errors) == errored, [(t.number, t.user_attrs) for t in errors]
    assert all(t.user_attrs.get("stop_reason") == "cancelled" for t in orphans), [t.user_attrs for t in orphans]

    listed = api_trials(api, sid)
    assert [(t["number"], t["state"], t["mlflow_run_id"]) for t in listed] == [
        (t.number, t.state.name, t.user_attrs.get("mlflow_run_id")) for t in trials]
    counts = body["trial_counts"]
    assert (counts["complete"], counts["failed"], counts["total"]) == (finished, errored + len(orphans), len(trials))

    client = MlflowClient(stack.mlflow_uri)
    runs = child_runs(client, body)
    per_tid = collections.Counter(r.data.tags.get("tune_trial_id") for r in runs)
    assert set(per_tid.values()) <= {1}, f"duplicated MLflow runs: {per_tid}"
    runs_by_tid = {r.data.tags["tune_trial_id"]: r for r in runs}
    assert set(runs_by_tid) <= {t.user_attrs.get("tune_trial_id") for t in trials}, "an MLflow run without a trial"
    for t in trials:
        run = runs_by_tid.get(t.user_attrs.get("tune_trial_id"))
        if t.state == TrialState.COMPLETE:
            assert run is not None and run.info.run_id == t.user_attrs["mlflow_run_id"], t.number
            assert (run.info.status, run.data.tags.get("stop_reason")) == ("FINISHED", "completed"), t.number
            hist = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
            assert [m.step for m in hist] == list(range(1, epochs + 1)), (t.number, [m.step for m in hist])
            assert math.isclose(hist[-1].value, t.value, rel_tol=1e-9), (t.number, hist[-1].value, t.value)
            arts = artifact_paths(client, run.info.run_id, "checkpoints")
            assert {f"checkpoints/epoch_{e:03d}/checkpoint.pt" for e in range(1, epochs + 1)} <= arts, arts
            assert t.user_attrs["checkpoint_uri"].endswith(f"/checkpoints/epoch_{t.user_attrs['epochs_done']:03d}")
        elif t in errors:
            assert run is not None and (run.info.status, run.data.tags.get("stop_reason")) == ("FAILED", "error")
        elif run is not None:  # an orphan that had started its run
            assert (run.info.status, run.data.tags.get("stop_reason")) == ("KILLED", "cancelled"), t.number
    best = body["best_trial"]
    top = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert best["value"] == top.value and best["mlflow_run_id"] in {r.info.run_id for r in runs}
    parent = client.get_run(body["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "SUCCEEDED"
    return body


def driver_pid(logs: str) -> int:
    """The study driver's pid, from its first log line (``driver starting (resume=..., pid N)``)."""
    m = re.search(r"driver starting \(resume=\w+, pid (\d+)\)", logs)
    assert m, logs[-3000:]
    return int(m.group(1))


def trial_results(stack: Stack, sid: str) -> dict[str, list[dict]]:
    """Tune's result.json of every trial of the study: {tune trial id: [results]}."""
    out: dict[str, list[dict]] = {}
    for f in (Path(stack.settings.tune_storage) / sid).glob("*/result.json"):
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        rows = [r for r in rows if "epoch" in r]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


# -- 1. the study driver SIGKILLed -----------------------------------------------------------------


def test_driver_killed_mid_sweep_is_interrupted_and_resume_finishes_it(stack: Stack, api: httpx.Client) -> None:
    n, epochs = 6, 4
    t0 = time.monotonic()
    sid = post(api, study_spec("faults driver kill", trials=n, epochs=epochs))

    def mid_sweep() -> bool:
        data = api_trials(api, sid)
        done = sum(t["state"] == "COMPLETE" for t in data)
        return done >= 2 and any(t["state"] == "RUNNING" and (t["epochs_done"] or 0) >= 1 for t in data)

    wait_until(mid_sweep, timeout=240, interval=0.2, what="2 finished trials and one mid-way")
    body = api.get(f"/studies/{sid}").json()
    jobs = jobs_of(stack)
    pid = driver_pid(jobs.get_job_logs(body["submission_id"]))
    kill_pid(pid, expect_in_cmdline="service.sweep.driver")
    print(f"\n[faults] driver pid {pid} SIGKILLed {time.monotonic() - t0:.1f}s after POST; "
          f"trials then: {body['trial_counts']}")

    body = wait_for_status(api, sid, FINAL, timeout=120)
    assert body["status"] == "INTERRUPTED", body
    assert "SIGKILL" in body["error"] and f"/studies/{sid}/resume" in body["error"], body["error"]
    assert jobs.get_job_info(body["submission_id"]).driver_exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL)
    assert body["trial_counts"]["running"] >= 1  # nobody ended the trials the kill cut off
    assert body["trial_counts"]["complete"] < n

    r = api.post(f"/studies/{sid}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["submission_id"] == f"bonn-sweep-{sid}-r1"
    body, _ = succeeded(stack, api, sid, "restoring Tune state", "searcher restored", finished=n, epochs=epochs)
    print(f"[faults] driver kill: SUCCEEDED after resume, {time.monotonic() - t0:.1f}s in all; "
          f"trials {body['trial_counts']}")


# -- 2. the API SIGKILLed and restarted --------------------------------------------------------------


def _kill_api(stack: Stack, api: httpx.Client) -> None:
    proc = stack.procs["api"]
    kill_pid(proc.pid, expect_in_cmdline="uvicorn")
    with pytest.raises(httpx.TransportError):
        api.get("/healthz", timeout=5.0)


def test_api_restarted_mid_sweep_does_not_disturb_it_and_catches_up(stack: Stack, api: httpx.Client) -> None:
    from service.launch.api_server import start_api
    from service.core.store import StudyStore

    n, epochs = 6, 6  # 3 rounds of 2 trials: time for two API restarts before the sweep ends
    t0 = time.monotonic()
    sid = post(api, study_spec("faults api restart", trials=n, epochs=epochs))
    wait_until(lambda: any((t["epochs_done"] or 0) >= 1 for t in api_trials(api, sid)), timeout=180,
               interval=0.3, what="a first epoch")
    sub = api.get(f"/studies/{sid}").json()["submission_id"]
    jobs = jobs_of(stack)
    store = StudyStore(stack.settings.store_url)
    try:
        # (a) down while trials run: the sweep goes on (a trial finishes meanwhile), then back
        _kill_api(stack, api)
        done_before = sum(t.state == TrialState.COMPLETE for t in optuna_trials(stack, sid))
        wait_until(lambda: sum(t.state == TrialState.COMPLETE for t in optuna_trials(stack, sid)) > done_before,
                   timeout=120, interval=0.5, what="a trial to finish while the API is down")
        assert jobs.get_job_status(sub) == JobStatus.RUNNING
        start_api(stack)
        body = api.get(f"/studies/{sid}").json()
        assert body["status"] == "RUNNING" and body["submission_id"] == sub
        assert body["trial_counts"]["complete"] > done_before

        # (b) down again until the job has ended: the restarted API's background reconcile catches up
        _kill_api(stack, api)
        wait_until(lambda: jobs.get_job_status(sub) in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=300,
                   interval=1.0, what="the job to end while the API is down")
        assert jobs.get_job_status(sub) == JobStatus.SUCCEEDED, jobs.get_job_logs(sub)[-5000:]
        assert store.get(sid).status == "RUNNING"  # nobody told the store yet
        start_api(stack)
        wait_until(lambda: store.get(sid).status == "SUCCEEDED", timeout=30, interval=0.2,
                   what="the reconcile loop of the restarted API")  # no GET in between
    finally:
        store.close()
        if not stack.procs["api"].alive():  # leave the session's API up for the next tests
            start_api(stack)
    body = check_accounting(stack, api, sid, finished=n, epochs=epochs)
    assert body["status"] == "SUCCEEDED" and body["ray_job_status"] == "SUCCEEDED"
    print(f"\n[faults] API restarts: study {sid} SUCCEEDED, {time.monotonic() - t0:.1f}s in all")


# -- 3. a trial's worker process SIGKILLed -------------------------------------------------------------


def test_trial_worker_killed_resumes_from_its_checkpoint(stack: Stack, api: httpx.Client) -> None:
    n, epochs = 3, 8
    t0 = time.monotonic()
    sid = post(api, study_spec("faults worker kill", trials=n, epochs=epochs, batch_size=16))

    def victim() -> tuple[str, dict] | None:
        for tid, rows in trial_results(stack, sid).items():
            if 2 <= rows[-1]["epoch"] <= epochs - 3:
                return tid, rows[-1]
        return None

    tid, last = wait_until(victim, timeout=240, interval=0.1, what="a trial between epochs 2 and 5")
    kill_pid(int(last["pid"]), expect_in_cmdline="ray::")
    print(f"\n[faults] trial {tid}'s worker (pid {last['pid']}) SIGKILLed after epoch {last['epoch']}, "
          f"{time.monotonic() - t0:.1f}s after POST")

    body, logs = succeeded(stack, api, sid, "retrying from its last checkpoint", "[resume] from", finished=n,
                        epochs=epochs)

    # the killed trial: retried once, resumed from a checkpoint (not from epoch 1), one MLflow run
    head, sep, tail = logs.partition(f"trial train_bonn_{tid} failed (failure 1), retrying")
    assert sep, logs[-5000:]
    before, after = epochs_by_trial(head).get(tid, []), epochs_by_trial(tail).get(tid, [])
    seen = before + after
    assert before == list(range(1, len(before) + 1)) and after == list(range(after[0], epochs + 1)), seen
    assert 1 < after[0] <= before[-1] + 1, seen  # at most the epoch whose checkpoint was not persisted again
    client = MlflowClient(stack.mlflow_uri)
    (run,) = [r for r in child_runs(client, body) if r.data.tags["tune_trial_id"] == tid]
    assert run.data.tags["retries"] == "1"
    print(f"[faults] worker kill: epochs reported {seen}; SUCCEEDED, {time.monotonic() - t0:.1f}s in all")


# -- 4. a diverging configuration ---------------------------------------------------------------------


def test_diverging_trial_errors_with_its_reason_and_the_study_goes_on(stack: Stack, api: httpx.Client) -> None:
    space = {
        "name": "faults-diverge",
        "parameters": {**DIGITS, "lr": {"type": "categorical", "choices": [0.05, 1.0e6]}},
        "fixed": {"model": "small_cnn", "dataset": "digits", "binarize": "bonn"},
        # lr=1e6 first: NaN loss in epoch 1; the others train normally
        "warm_start": [{"lam": 1e-4, "theta": 1e-3, "nu": 1e-4, "lr": 1.0e6},
                       {"lam": 1e-4, "theta": 1e-3, "nu": 1e-4, "lr": 0.05},
                       {"lam": 1e-3, "theta": 1e-2, "nu": 1e-3, "lr": 0.05}],
    }
    n, epochs = 3, 3
    t0 = time.monotonic()
    sid = post(api, study_spec("faults diverge", trials=n, epochs=epochs, batch_size=64, space=space))
    succeeded(stack, api, sid, finished=n - 1, epochs=epochs, errored=1)

    (bad,) = [t for t in api_trials(api, sid) if t["state"] == "FAIL"]
    assert bad["params"]["lr"] == 1.0e6 and bad["stop_reason"] == "error"
    assert bad["error"].startswith("TrainingDiverged: non-finite training loss in epoch 1"), bad
    assert all(t["error"] is None for t in api_trials(api, sid) if t["state"] == "COMPLETE")
    client = MlflowClient(stack.mlflow_uri)
    run = client.get_run(bad["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == "error"
    assert run.data.tags["error_reason"] == bad["error"]
    assert "TrainingDiverged" in run.data.tags["error"] and run.data.tags["retries"] == "2"
    assert run.data.params["lr"] == "1000000.0"
    print(f"\n[faults] divergence: {bad['error'][:80]}...; study SUCCEEDED in {time.monotonic() - t0:.1f}s")


# -- 5. the MLflow server down for 30 s ----------------------------------------------------------------


def test_mlflow_down_30s_mid_sweep_loses_nothing(stack: Stack, api: httpx.Client) -> None:
    from service.launch.processes import http_ok as _http_ok, kill_now as _kill_now, spawn as _spawn
    from service.launch.stack_record import ENV_EMBEDDED

    n, epochs, outage_s = 2, 14, 30.0
    t0 = time.monotonic()
    sid = post(api, study_spec("faults mlflow down", trials=n, epochs=epochs))

    def both_logging() -> bool:  # both trials have their run and an epoch in MLflow
        data = api_trials(api, sid)
        return len(data) == n and all(t["mlflow_run_id"] and (t["epochs_done"] or 0) >= 1 for t in data)

    wait_until(both_logging, timeout=240, interval=0.2, what="both trials logging to MLflow")
    old = stack.procs["mlflow"]
    _kill_now(old)
    t_down = time.monotonic()
    epochs_at_kill = {t["number"]: t["epochs_done"] for t in api_trials(api, sid)}
    print(f"\n[faults] MLflow (pid {old.pid}) SIGKILLed {t_down - t0:.1f}s after POST; epochs then {epochs_at_kill}")
    try:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{stack.mlflow_uri}/health", timeout=2.0)
        # the sweep goes on meanwhile: epochs keep coming (Optuna holds them; MLflow cannot)
        wait_until(lambda: sum(t["epochs_done"] or 0 for t in api_trials(api, sid)) >= sum(epochs_at_kill.values()) + 3,
                   timeout=outage_s, interval=0.5, what="epochs reported while MLflow is down")
        time.sleep(max(0.0, outage_s - (time.monotonic() - t_down)))
        epochs_in_outage = {t["number"]: t["epochs_done"] for t in api_trials(api, sid)}
    finally:
        env = {**os.environ, **ENV_EMBEDDED}
        proc, popen = _spawn("mlflow", old.cmd, Path(old.log), env, cwd=Path(stack.home))
        stack.procs["mlflow"] = proc
        stack.save()  # stop_stack stops the new server
        wait_until(_http_ok(f"{stack.mlflow_uri}/health"), timeout=90, interval=0.25, what="MLflow back")
    print(f"[faults] MLflow back {time.monotonic() - t_down:.1f}s after the kill; epochs reported by then "
          f"{epochs_in_outage}")

    body, _ = succeeded(stack, api, sid, "unreachable", "reachable again", finished=n, epochs=epochs)
    assert body["registered_model"]  # and every epoch and checkpoint reached MLflow once
    print(f"[faults] MLflow outage: SUCCEEDED, nothing lost, {time.monotonic() - t0:.1f}s in all")
