"""A data-parallel trial on a real local Ray cluster: the study driver as a real Ray Job.

Two digits trials, one after the other, with ``resources: {cpus_per_trial: 1,
data_parallel_workers: 2}`` on the 2-CPU cluster of the session ``stack`` fixture (or a Ray head +
MLflow of this module when the shared stack cannot start): Tune reserves a placement group of two
1-CPU bundles per trial; rank 0 is the trial actor, rank 1 an actor in the second bundle
(trainables/tune.py), with a gloo process group between them. ASHA may stop the second trial early
(a stop ends its rank-1 actor), and the second trial reuses the first one's trial actor
(``reuse_actors=True``) with a fresh rank-1 actor.

Checks: the study succeeds; every trial reported every epoch it ran with a checkpoint (MLflow metric
history and checkpoint artifacts per epoch, Tune's checkpoint folder); ``world_size`` = 2 in every
report and rank 1's own log line in the job log once per trial (the process group really had two
members); ``val_acc`` on digits > 0.5 after 4 epochs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")
pytest.importorskip("ray.job_submission")

from mlflow import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from tests.integration.driver_jobs import job_payload, run_driver_job  # noqa: E402

EPOCHS = 4
NUM_TRIALS = 2


def _payload(cluster, name: str) -> dict:
    return job_payload({
        "name": name,
        "search_space": "digits-smoke",
        # a digits recipe that learns in a few epochs; batch_size is the global batch (2 x 16)
        "base": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.1, "schedule": "cosine", "hist_epochs": [0, 2],
                 "device": "cpu"},
        "sampler": {"type": "tpe", "seed": 0},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "budget": {"num_trials": NUM_TRIALS, "max_concurrent_trials": 1, "max_failed_trials": 0},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "data_parallel_workers": 2},
        "checkpoints": {"upload": "all"},  # every epoch's checkpoint in MLflow (checked below)
    }, mlflow_uri=cluster.mlflow_uri, optuna_storage=f"sqlite:///{cluster.home}/optuna-dp-tests.db",
        tune_storage=str(cluster.home / "tune"), id_prefix="dp")


def test_data_parallel_trial_two_gloo_workers(cluster):
    jobs = JobSubmissionClient(cluster.dashboard)
    payload = _payload(cluster, "dp it digits")
    t0 = time.monotonic()
    status, logs = run_driver_job(jobs, payload)
    wall = time.monotonic() - t0
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    print(f"\n[test_data_parallel] study wall {wall:.1f}s (submit -> SUCCEEDED)")
    assert "gpu=0 x2" in logs  # the driver's resource line: 2 workers per trial
    # rank 1 ran in its own actor and joined the gloo group, once per trial (its fit logs this line;
    # rank 0's goes to the trial's log): the job log carries the actors' output
    assert logs.count("[rank 1] [I] data-parallel: rank 1 of 2 (gloo)") == NUM_TRIALS, logs[-6000:]

    # -- Optuna ------------------------------------------------------------------------------------
    study = optuna.load_study(study_name=payload["study_id"], storage=payload["optuna_storage"])
    trials = study.get_trials()
    assert len(trials) == NUM_TRIALS
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}, [t.state for t in trials]
    assert trials[0].state == TrialState.COMPLETE and trials[0].user_attrs["epochs_done"] == EPOCHS
    by_tid = {t.user_attrs["tune_trial_id"]: t for t in trials}

    # -- MLflow: one child run per trial, a report per epoch, world_size 2, a checkpoint per epoch --
    client = MlflowClient(cluster.mlflow_uri)
    runs = client.search_runs([payload["experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{payload['parent_run_id']}'")
    assert sorted(r.data.tags["tune_trial_id"] for r in runs) == sorted(by_tid)
    finals = []
    for run in runs:
        t = by_tid[run.data.tags["tune_trial_id"]]
        done = t.user_attrs["epochs_done"]
        assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == t.user_attrs["stop_reason"]
        val = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        assert [m.step for m in val] == list(range(1, done + 1))
        ws = client.get_metric_history(run.info.run_id, "world_size")
        assert sorted(m.step for m in ws) == list(range(1, done + 1)) and {m.value for m in ws} == {2.0}
        arts = set()
        for f in client.list_artifacts(run.info.run_id, "checkpoints"):
            arts |= {g.path for g in client.list_artifacts(run.info.run_id, f.path)}
        for e in range(1, done + 1):
            assert f"checkpoints/epoch_{e:03d}/checkpoint.pt" in arts, sorted(arts)
        if done == EPOCHS:
            finals.append([round(m.value, 3) for m in val])
    assert finals and max(f[-1] for f in finals) > 0.5, finals

    # -- Tune: one result per epoch, each with node_id and world_size 2; checkpoints readable -------
    import torch

    exp = Path(payload["tune_storage"]) / payload["study_id"]
    trial_dirs = [d for d in exp.iterdir() if d.is_dir() and d.name.startswith("train_bonn_")]
    assert len(trial_dirs) == NUM_TRIALS
    for trial_dir in trial_dirs:
        results = [json.loads(ln) for ln in (trial_dir / "result.json").read_text().splitlines() if ln.strip()]
        rows = [r for r in results if "epoch" in r]
        done = by_tid[rows[0]["trial_id"]].user_attrs["epochs_done"]
        assert [r["epoch"] for r in rows] == list(range(1, done + 1))
        assert all(r.get("world_size") == 2 and r.get("node_id") for r in rows)
        ckpts = sorted(trial_dir.glob("checkpoint_*/checkpoint.pt"))
        assert ckpts, f"no Tune checkpoint kept in {trial_dir.name}"
        ck = torch.load(ckpts[-1], weights_only=True, map_location="cpu")
        assert ck["epoch"] in range(1, done + 1) and ck["config"]["batch_size"] == 32
    print(f"[test_data_parallel] val_acc by epoch of the completed trial(s): {finals}")
