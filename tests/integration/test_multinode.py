"""Two Ray nodes on this machine, no Docker: trials pinned to the worker by a custom resource, and a
worker node lost mid-trial.

The cluster: a Ray head (``--num-cpus 1``, runs the study driver as a Ray Job) plus MLflow, started by
:func:`service.launch.stack.start_stack`, and a worker node (``ray start --address=<head GCS> --block``,
``--num-cpus 2``, ``--resources '{"bonn_worker": 100}'``, its own ``--temp-dir`` and ports) started by
:func:`service.launch.ray_cluster.start_ray_worker` as a separate process group. Tune storage is a folder of this
machine, which both nodes reach (the stand-in for the shared volume of a real cluster). The head's
GCS checks node health every second (3 misses = dead) so that a lost node is noticed in seconds.

1. A study with ``resources.custom: {bonn_worker: 1}``: every trial reports the Ray node it ran on
   (``node_id`` in its results, trainables/tune.py; the driver prints it in its per-epoch line of the
   job log) -- all the worker, never the head, which has a CPU free; Optuna and MLflow hold every
   trial once.
2. The same, and the worker node is SIGKILLed (its whole process group: raylet, trial actors) right
   after the first epoch report of a trial, then started again with the same resources. Tune retries
   the trials that were running (``FailureConfig``) from their last checkpoints on the new node: their
   epochs there continue where the old node stopped (> 1, no epoch reported twice); the study still
   finishes with every trial COMPLETE, one MLflow child run per trial, each epoch logged once.

Per-epoch evidence comes from the driver's job log (``trial <name> epoch E/N ... node=<id>``, one line
per result Tune received), not from Tune's ``result.json``: when Tune restores a trial its JSON logger
replaces the driver's ``result.json`` by the copy in storage, which can lag by a row.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")
pytest.importorskip("ray.job_submission")

from mlflow import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray.job_submission import JobStatus, JobSubmissionClient  # noqa: E402

from tests.integration.driver_jobs import TERMINAL, job_payload, submit_driver_job, wait_job  # noqa: E402

WORKER = "ray-worker-1"
WORKER_RESOURCES = {"bonn_worker": 100}
FAST_HEALTH_CHECK = {  # GCS -> raylet health checks (Ray config via RAY_<name>)
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    from service.launch.ray_cluster import start_ray_worker
    from service.launch.stack import start_stack, stop_stack
    from service.launch.watchdog import spawn_watchdog

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    home = tmp_path_factory.mktemp("multinode") / "home"
    watchdog = spawn_watchdog(home)
    try:
        t0 = time.monotonic()
        st = start_stack(home, num_cpus=1, with_api=False, extra_env=FAST_HEALTH_CHECK)
        _, worker_id = start_ray_worker(st, name=WORKER, num_cpus=2, resources=WORKER_RESOURCES,
                                        extra_env=FAST_HEALTH_CHECK)
        print(f"\n[multinode] head + worker + MLflow up in {time.monotonic() - t0:.1f}s; worker node {worker_id[:12]}")
        yield SimpleNamespace(stack=st, home=Path(st.home), worker_id=worker_id,
                              jobs=JobSubmissionClient(st.ray_dashboard_url))
    finally:
        t0 = time.monotonic()
        stop_stack(home, remove_temp=True, quiet=True)
        print(f"\n[multinode] stopped in {time.monotonic() - t0:.1f}s")
        with contextlib.suppress(ProcessLookupError):
            os.kill(watchdog.pid, signal.SIGTERM)
        watchdog.wait(timeout=10)


def _head_id(nodes) -> str:
    from service.launch.ray_cluster import ray_nodes

    (head,) = [n["node_id"] for n in ray_nodes(nodes.stack) if n.get("is_head_node")]
    return head


def _payload(nodes, name: str, num_trials: int, epochs: int, batch_size: int) -> dict:
    return job_payload({
        "name": name,
        "search_space": "digits-smoke",
        "base": {"epochs": epochs, "batch_size": batch_size, "lr": 0.1, "schedule": "cosine", "hist_epochs": [],
                 "device": "cpu"},
        "sampler": {"type": "tpe", "seed": 0},
        "scheduler": {"type": "fifo"},
        "budget": {"num_trials": num_trials, "max_concurrent_trials": 2, "max_failed_trials": 0},
        "resources": {"cpus_per_trial": 1, "custom": {"bonn_worker": 1}},
    }, mlflow_uri=nodes.stack.mlflow_uri, optuna_storage=f"sqlite:///{nodes.home}/optuna-multinode.db",
        tune_storage=str(nodes.home / "shared" / "tune"),  # reached by both nodes
        id_prefix="mn")


def _submit(nodes, payload: dict) -> str:
    return submit_driver_job(nodes.jobs, payload)


def _wait(nodes, job_id: str, timeout: float = 240.0) -> JobStatus:
    return wait_job(nodes.jobs, job_id, timeout)


def _tune_results(payload: dict) -> dict[str, list[dict]]:
    """Tune's result.json of every trial of the study: {trial_id: [per-epoch results]}."""
    exp = Path(payload["tune_storage"]) / payload["study_id"]
    out: dict[str, list[dict]] = {}
    for f in exp.glob("*/result.json"):
        rows = []
        for line in f.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        rows = [r for r in rows if "epoch" in r]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


EPOCH_LINE = re.compile(r"trial train_bonn_(\w+) epoch (\d+)/\d+ .* node=(\w+)")


def _epochs_by_trial(logs: str) -> dict[str, list[tuple[int, str]]]:
    """{tune trial id: [(epoch, node id prefix), ...]} in the order the driver received them."""
    out: dict[str, list[tuple[int, str]]] = {}
    for m in EPOCH_LINE.finditer(logs):
        out.setdefault(m.group(1), []).append((int(m.group(2)), m.group(3)))
    return out


def _node(node_id: str) -> str:
    from service.sweep.monitor import NODE_ID_CHARS

    return node_id[:NODE_ID_CHARS]


def _check_accounting(nodes, payload: dict, num_trials: int, epochs: int, logs: str
                      ) -> dict[str, list[tuple[int, str]]]:
    """Optuna: num_trials trials, all COMPLETE; MLflow: one child run per Tune trial, each epoch once."""
    study = optuna.load_study(study_name=payload["study_id"], storage=payload["optuna_storage"])
    trials = study.get_trials()
    assert len(trials) == num_trials, [(t.number, t.state.name) for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state.name) for t in trials]
    client = MlflowClient(nodes.stack.mlflow_uri)
    runs = client.search_runs([payload["experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{payload['parent_run_id']}'",
                              max_results=100)
    per_trial = collections.Counter(r.data.tags["tune_trial_id"] for r in runs)
    assert len(runs) == num_trials and set(per_trial.values()) == {1}, per_trial
    assert set(per_trial) == {t.user_attrs["tune_trial_id"] for t in trials}
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["stop_reason"] == "completed"
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc"))
        assert steps == list(range(1, epochs + 1)), (r.info.run_name, steps)
    seen = _epochs_by_trial(logs)
    assert set(seen) == set(per_trial), (sorted(seen), sorted(per_trial))
    return seen


def test_trials_run_only_on_the_node_with_the_custom_resource(nodes):
    payload = _payload(nodes, "multinode placement", num_trials=2, epochs=3, batch_size=64)
    t0 = time.monotonic()
    job = _submit(nodes, payload)
    status = _wait(nodes, job)
    logs = nodes.jobs.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    print(f"\n[multinode] placement study: {time.monotonic() - t0:.1f}s submit -> SUCCEEDED")
    assert "bonn_worker=1" in logs  # the driver's resource line
    seen = _check_accounting(nodes, payload, num_trials=2, epochs=3, logs=logs)
    head = _node(_head_id(nodes))
    for tid, rows in seen.items():
        assert [e for e, _ in rows] == [1, 2, 3], (tid, rows)
        ran_on = {n for _, n in rows}
        assert ran_on == {_node(nodes.worker_id)}, (tid, ran_on, "head" if head in ran_on else "")


def test_worker_node_lost_mid_trial_resumes_from_checkpoint(nodes):
    from service.launch.ray_cluster import start_ray_worker, stop_ray_worker

    epochs = 4
    payload = _payload(nodes, "multinode node loss", num_trials=3, epochs=epochs, batch_size=16)
    t0 = time.monotonic()
    job = _submit(nodes, payload)
    old_worker = nodes.worker_id
    # wait for the first epoch report of some trial, then lose the worker node
    deadline = time.monotonic() + 150
    while not _tune_results(payload):
        assert time.monotonic() < deadline, nodes.jobs.get_job_logs(job)[-5000:]
        assert nodes.jobs.get_job_status(job) not in TERMINAL, nodes.jobs.get_job_logs(job)[-5000:]
        time.sleep(0.1)
    before = {tid: [r["epoch"] for r in rows] for tid, rows in _tune_results(payload).items()}
    t_kill = time.monotonic()
    assert stop_ray_worker(nodes.stack, WORKER, hard=True)
    print(f"\n[multinode] killed the worker node {time.monotonic() - t0:.1f}s after submit; epochs seen {before}")
    time.sleep(3.0)  # the node is gone for a while: trials fail, nothing else can run them
    _, new_worker = start_ray_worker(nodes.stack, name=WORKER, num_cpus=2, resources=WORKER_RESOURCES,
                                     extra_env=FAST_HEALTH_CHECK)
    nodes.worker_id = new_worker
    print(f"[multinode] worker node back after {time.monotonic() - t_kill:.1f}s as {new_worker[:12]}")
    status = _wait(nodes, job)
    logs = nodes.jobs.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    print(f"[multinode] node-loss study: {time.monotonic() - t0:.1f}s submit -> SUCCEEDED")
    assert "retrying from its last checkpoint" in logs, logs[-6000:]
    assert "[resume] from" in logs

    seen = _check_accounting(nodes, payload, num_trials=3, epochs=epochs, logs=logs)
    head, old_node, new_node = _node(_head_id(nodes)), _node(old_worker), _node(new_worker)
    resumed, summary = 0, []
    for tid, rows in seen.items():
        nodes_seen = {n for _, n in rows}
        assert head not in nodes_seen and nodes_seen <= {old_node, new_node}, (tid, rows)
        old = [e for e, n in rows if n == old_node]
        new = [e for e, n in rows if n == new_node]
        # each node ran a contiguous run of epochs; the trial ends at the last epoch. An epoch whose
        # result reached the driver while its checkpoint had not been persisted when the node died is
        # trained again (at-least-once epochs); MLflow still holds each epoch once (_check_accounting).
        assert old == list(range(1, len(old) + 1)), (tid, old, new)
        if new:
            assert new == list(range(new[0], epochs + 1)), (tid, old, new)
        else:
            assert old == list(range(1, epochs + 1)), (tid, old, new)
        if old and new:  # cut by the node loss, retried on the new node from its last checkpoint
            assert new[0] <= old[-1] + 1, (tid, old, new)
            if tid in before:  # its epoch result (and checkpoint) was recorded before the kill
                resumed += 1
                assert 1 < new[0], (tid, old, new)  # resumed, not restarted from epoch 1
            # else: its first result reached the driver as the node died, before its checkpoint was
            # recorded: trained again from epoch 1 (at-least-once), which is allowed
        summary.append(f"{tid}: old node {old} new node {new}")
    print(f"[multinode] {resumed} trial(s) resumed from a checkpoint on the new node: " + "; ".join(summary))
    assert resumed >= 1
