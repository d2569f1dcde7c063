"""The study driver as a real Ray Job on a real local cluster with a real MLflow server.

A digits study (4 trials x 3 epochs, ASHA grace_period=1, reduction_factor=2 so that some trials are
stopped early) is submitted through the Jobs API exactly as the API does (entrypoint
``<python> -m service.sweep.driver``, payload in ``BONN_SWEEP_JOB``, ``RAY_JOB_STOP_SIGNAL=SIGINT``); the
test then reads Optuna's storage and MLflow directly. The cancel/resume test stops the job after
the first trial ends (SIGINT through ``stop_job``), resumes it with ``resume=true`` and a larger
``num_trials``, and checks the study ends with exactly the requested trials and one MLflow run per
Tune trial.

Uses the session ``stack`` fixture (Ray head + MLflow + API) when it can start, else starts Ray +
MLflow only, for this module, and stops them by pid.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

optuna = pytest.importorskip("optuna")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("ray.job_submission")

from mlflow import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from tests.integration.driver_jobs import (  # noqa: E402
    TERMINAL,
    job_payload,
    run_driver_job,
    submit_driver_job,
    wait_job,
)

EPOCHS = 3


@pytest.fixture(scope="module")
def jobs(cluster):
    return JobSubmissionClient(cluster.dashboard)


def make_payload(cluster, name: str, num_trials: int = 4, base: dict | None = None, **budget) -> dict:
    return job_payload({
        "name": name,
        "search_space": "digits-smoke",
        "base": {"epochs": EPOCHS, "hist_epochs": [0, 2], **(base or {})},
        "sampler": {"type": "tpe", "seed": 0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "budget": {"num_trials": num_trials, "max_concurrent_trials": 2, "max_failed_trials": 1, **budget},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    }, mlflow_uri=cluster.mlflow_uri, optuna_storage=f"sqlite:///{cluster.home}/optuna-driver-tests.db",
        tune_storage=str(cluster.home / "tune"), id_prefix="drv")


def study_of(payload):
    return optuna.load_study(study_name=payload["study_id"], storage=payload["optuna_storage"])


def child_runs(client, payload):
    return client.search_runs(
        [payload["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{payload['parent_run_id']}'",
        max_results=1000,
    )


def artifact_paths(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def timing_lines(logs: str) -> str:
    return "\n".join(ln for ln in logs.splitlines()
                     if "tuning loop ended" in ln or "MLflow callback time" in ln or "SUCCEEDED in" in ln)


def test_digits_study_asha_end_to_end(cluster, jobs):
    payload = make_payload(cluster, "driver it digits")
    t0 = time.monotonic()
    status, logs = run_driver_job(jobs, payload)
    wall = time.monotonic() - t0
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    print(f"\n[test_driver] study wall {wall:.1f}s (submit -> SUCCEEDED)\n{timing_lines(logs)}")
    assert "trial train_bonn_" in logs and "SUCCEEDED" in logs

    # -- Optuna -----------------------------------------------------------------------------------
    study = study_of(payload)
    trials = study.get_trials()
    assert len(trials) == 4
    states = collections.Counter(t.state for t in trials)
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    assert states[TrialState.PRUNED] >= 1 and states[TrialState.COMPLETE] >= 1, states
    for t in trials:
        ua = t.user_attrs
        for key in ("tune_trial_id", "mlflow_run_id", "epochs_done", "best_value", "best_epoch", "last_value",
                    "checkpoint_uri", "stop_reason"):
            assert key in ua, (t.number, key, ua)
        if t.state == TrialState.PRUNED:
            assert ua["stop_reason"] == "early_stopped" and ua["epochs_done"] < EPOCHS
            assert t.value == ua["last_value"]
        else:
            assert ua["stop_reason"] == "completed" and ua["epochs_done"] == EPOCHS
        # objective.selection=last (the default): the value and the checkpoint are the last epoch's
        assert ua["checkpoint_uri"].endswith(f"/checkpoints/epoch_{ua['epochs_done']:03d}")
    ref = study.user_attrs["registered_model"]
    name, version = ref.split("/")
    assert name == "bonn-sweep-driver-it-digits"

    # -- MLflow -----------------------------------------------------------------------------------
    client = MlflowClient(cluster.mlflow_uri)
    runs = child_runs(client, payload)
    by_tid = collections.Counter(r.data.tags["tune_trial_id"] for r in runs)
    assert len(runs) == 4 and set(by_tid.values()) == {1}
    opt_by_tid = {t.user_attrs["tune_trial_id"]: t for t in trials}
    assert set(by_tid) == set(opt_by_tid)
    for r in runs:
        t = opt_by_tid[r.data.tags["tune_trial_id"]]
        assert r.info.run_id == t.user_attrs["mlflow_run_id"]
        assert r.data.tags["study_id"] == payload["study_id"]
        assert r.data.tags["stop_reason"] == t.user_attrs["stop_reason"]
        assert r.info.status == "FINISHED"
        for p in ("lam", "theta", "nu"):
            assert float(r.data.params[p]) == pytest.approx(t.params[p])
        assert r.data.params["epochs"] == str(EPOCHS) and "lr_gamma" in r.data.params  # defaults too
        hist = client.get_metric_history(r.info.run_id, "val_acc")
        assert sorted(m.step for m in hist) == list(range(1, t.user_attrs["epochs_done"] + 1))
        arts = artifact_paths(client, r.info.run_id)
        # checkpoints.upload's default best_and_last: the run keeps its best and its last epoch only
        kept = {p.split("/")[1] for p in arts if p.startswith("checkpoints/") and p.endswith("checkpoint.pt")}
        assert kept == {f"epoch_{e:03d}" for e in (t.user_attrs["best_epoch"], t.user_attrs["epochs_done"])}, kept
        assert "plots/weights_hist_epoch000.png" in arts  # the initial-weights plot rides with epoch 1
    parent = client.get_run(payload["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "SUCCEEDED"
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert parent.data.tags["registered_model"] == ref
    assert client.get_metric_history(payload["parent_run_id"], "best_so_far")

    # -- the study's plots on the parent run, refreshed while it ran and final (service.sweep.analysis) --
    parts = artifact_paths(client, payload["parent_run_id"], "analysis")
    assert {f"analysis/{n}.png" for n in ("optimization_history", "parallel_coordinate", "slice",
                                           "intermediate_values")} | {"analysis/study.html"} <= parts, parts
    if sum(t.state == TrialState.COMPLETE for t in trials) >= 2:
        assert {"lam", "theta", "nu"} <= {k.split(".", 1)[1] for k in parent.data.metrics if k.startswith("importance.")}
    assert "analysis (final) of 4 finished trial(s)" in logs

    # -- Tune storage: checkpoints.keep's default best_and_last keeps at most two per trial ---------
    exp = Path(payload["tune_storage"]) / payload["study_id"]
    for trial_dir in (d for d in exp.iterdir() if d.is_dir() and d.name.startswith("train_bonn_")):
        assert 1 <= len(list(trial_dir.glob("checkpoint_*"))) <= 2, sorted(trial_dir.iterdir())

    # -- Model Registry: the best trial's model loads and predicts ----------------------------------
    mv = client.get_model_version(name, version)
    assert mv.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    mlflow.set_tracking_uri(cluster.mlflow_uri)
    model = mlflow.pytorch.load_model(f"models:/{name}/{version}")
    import torch

    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 1, 8, 8))
    assert tuple(out.shape) == (2, 10)


def test_cancel_then_resume_with_more_trials(cluster, jobs):
    payload = make_payload(cluster, "driver it cancel", num_trials=4)
    job = submit_driver_job(jobs, payload, "-a")
    # cancel (SIGINT via stop_job, as the API does) once the first trial has ended
    t0 = time.monotonic()
    while True:
        logs = jobs.get_job_logs(job)
        if "completed after" in logs or "early_stopped after" in logs:
            break
        status = jobs.get_job_status(job)
        assert status not in TERMINAL, logs[-4000:]
        assert time.monotonic() - t0 < 300, "no trial ended within 300s"
        time.sleep(0.3)
    assert jobs.stop_job(job)
    assert wait_job(jobs, job, timeout=120) == JobStatus.STOPPED
    logs = jobs.get_job_logs(job)
    assert "cancel requested (SIGINT)" in logs and "cancelled" in logs, logs[-4000:]

    client = MlflowClient(cluster.mlflow_uri)
    study = study_of(payload)
    before = study.get_trials()
    unfinished = [t for t in before if t.state == TrialState.RUNNING]
    parent = client.get_run(payload["parent_run_id"])
    assert parent.data.tags["status"] == "CANCELLED" and parent.info.status == "KILLED"
    assert Path(payload["tune_storage"], payload["study_id"], "tuner.pkl").exists()
    for r in child_runs(client, payload):
        if r.data.tags.get("stop_reason") == "cancelled":
            assert r.info.status == "KILLED"
    print(f"\n[test_driver] cancelled with {len(before)} Optuna trials, {len(unfinished)} unfinished")

    # resume: same Tune state, Optuna study and parent run; one more trial than first requested
    resumed = {**payload, "resume": True, "num_trials": 5}
    status, logs2 = run_driver_job(jobs, resumed, "-b")
    assert status == JobStatus.SUCCEEDED, logs2[-6000:]
    assert "restoring Tune state" in logs2
    print(timing_lines(logs2))

    trials = study_of(payload).get_trials()
    assert len(trials) == 5, [(t.number, t.state.name) for t in trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for t in unfinished:  # the trials cut by the cancel finished in the resumed run, same Optuna trial
        assert trials[t.number].state in (TrialState.COMPLETE, TrialState.PRUNED)
    runs = child_runs(client, payload)
    per_trial = collections.Counter(r.data.tags["tune_trial_id"] for r in runs)
    assert len(per_trial) == 5 and set(per_trial.values()) == {1}, per_trial
    assert set(per_trial) == {t.user_attrs["tune_trial_id"] for t in trials}
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["stop_reason"] in ("completed", "early_stopped")
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, max(steps) + 1)), (r.info.run_name, steps)  # no epoch twice
    parent = client.get_run(payload["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "SUCCEEDED"
    assert study_of(payload).user_attrs["registered_model"].startswith("bonn-sweep-driver-it-cancel/")


def test_failure_limit_fails_the_study(cluster, jobs):
    """Every trial errors (its data file is missing); max_failed_trials=0: the first error ends it."""
    payload = make_payload(cluster, "driver it failing", num_trials=3,
                           base={"dataset": "npz", "data_root": "/nonexistent/bonn-sweep-test.npz"},
                           max_failed_trials=0, max_concurrent_trials=1)
    status, logs = run_driver_job(jobs, payload)
    assert status == JobStatus.FAILED, logs[-4000:]
    assert "more than 0 trials failed" in logs and "retrying from its last checkpoint" in logs

    trials = study_of(payload).get_trials()
    assert len(trials) == 1, [(t.number, t.state.name) for t in trials]  # no new trial after the limit
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["stop_reason"] == "error"
    client = MlflowClient(cluster.mlflow_uri)
    runs = child_runs(client, payload)
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["stop_reason"] == "error"
    assert "data_root" in runs[0].data.tags["error"] and runs[0].data.tags["retries"] == "2"
    parent = client.get_run(payload["parent_run_id"])
    assert parent.info.status == "FAILED" and parent.data.tags["status"] == "FAILED"
    assert "max_failed_trials=0" in parent.data.tags["error"]


def test_multi_objective_study_finds_a_pareto_front(cluster, jobs):
    """objective.also: Optuna searches (val_acc max, epoch_time_s min) without ASHA; every trial COMPLETE
    with two values; the Pareto front on the parent run and in its plots; the primary best registered."""
    payload = job_payload({
        "name": "driver it pareto",
        "search_space": "digits-smoke",
        "base": {"epochs": 1, "hist_epochs": []},
        "objective": {"metric": "val_acc", "mode": "max", "also": [{"metric": "epoch_time_s", "mode": "min"}]},
        "sampler": {"type": "tpe", "seed": 0},
        "budget": {"num_trials": 3, "max_concurrent_trials": 2, "max_failed_trials": 0},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    }, mlflow_uri=cluster.mlflow_uri, optuna_storage=f"sqlite:///{cluster.home}/optuna-driver-tests.db",
        tune_storage=str(cluster.home / "tune"), id_prefix="mo")
    assert payload["spec"]["scheduler"]["type"] == "fifo"
    status, logs = run_driver_job(jobs, payload)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]

    study = study_of(payload)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.user_attrs["objective_names"] == ["val_acc", "epoch_time_s"]
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    front = {t.number for t in study.best_trials}
    client = MlflowClient(cluster.mlflow_uri)
    parent = client.get_run(payload["parent_run_id"])
    assert parent.data.tags["status"] == "SUCCEEDED"
    assert {p["number"] for p in json.loads(parent.data.tags["pareto_front"])} == front
    best = max(study.best_trials, key=lambda t: t.values[0])
    assert parent.data.tags["best_trial"] == str(best.number)
    assert "analysis/pareto_front.png" in artifact_paths(client, payload["parent_run_id"], "analysis")
