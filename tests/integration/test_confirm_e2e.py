"""The confirmation stage end to end on the embedded stack (real Ray, MLflow, HTTP; digits): a study with
``confirm`` is cancelled while its confirmation runs, resumed, its driver SIGKILLed during the
confirmation (INTERRUPTED), resumed again, and ends with the confirmation everywhere a
user looks -- ``GET /studies/{id}``, the MLflow parent run (metrics, plot), confirmation child runs (tagged
``bonn_sweep.stage=confirm``, none duplicated), the registered model (the confirmed run, with its test
accuracy) and ``bonn-sweep studies show``."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from service.launch.stack_record import Stack
from tests.conftest import wait_until
from tests.integration.conftest import wait_for_status
from tests.integration.driver_jobs import kill_pid
from tests.integration.test_api_e2e import all_artifacts, child_runs, mlflow_client, optuna_trials
from tests.integration.test_faults import driver_pid, jobs_of

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

STUDY = {
    "name": "e2e confirm",
    "search_space": "digits-smoke",
    "base": {"epochs": 2},
    "objective": {"metric": "val_acc", "mode": "max", "selection": "last"},
    "sampler": {"type": "tpe", "seed": 0},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "budget": {"num_trials": 3, "max_concurrent_trials": 2, "max_failed_trials": 1},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    "confirm": {"seeds": 3, "top_k": 1, "epochs": 3},
}


def test_bad_confirm_is_a_422_naming_the_field(api: httpx.Client) -> None:
    r = api.post("/studies", json={**STUDY, "confirm": {"seeds": 0}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-2:] == ["confirm", "seeds"], r.text
    r = api.post("/studies", json={**STUDY, "objective": {"selection": "first"}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-2:] == ["objective", "selection"], r.text


def test_confirmation_cancel_resume_and_everywhere(stack: Stack, api: httpx.Client, monkeypatch, capsys) -> None:
    r = api.post("/studies", json=STUDY)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def confirmation_started() -> dict | None:
        body = api.get(f"/studies/{sid}").json()
        conf = body.get("confirmation")
        if body["status"] not in ("PENDING", "RUNNING"):
            return body
        return body if conf and conf["runs_done"] >= 1 else None

    body = wait_until(confirmation_started, timeout=400, interval=0.5, what="a first confirmation run")
    assert body["status"] == "RUNNING", body.get("error")
    total = body["confirmation"]["runs_total"]
    assert body["confirmation"]["runs_done"] < total
    r = api.post(f"/studies/{sid}/cancel")
    assert r.status_code == 200, r.text
    body = wait_for_status(api, sid, {"CANCELLED", "SUCCEEDED", "FAILED"}, timeout=180)
    assert body["status"] == "CANCELLED", body.get("error")
    done_before = body["confirmation"]["runs_done"]
    assert 1 <= done_before < total

    assert api.post(f"/studies/{sid}/resume").status_code == 200

    def more_runs_done() -> dict | None:
        body = api.get(f"/studies/{sid}").json()
        if body["status"] not in ("PENDING", "RUNNING"):
            return body
        return body if body["confirmation"]["runs_done"] > done_before else None

    body = wait_until(more_runs_done, timeout=300, interval=0.3, what="one more confirmation run")
    if body["status"] == "RUNNING" and body["confirmation"]["runs_done"] < total:
        # a killed driver saves nothing: the resume must neither repeat a recorded run nor lose one
        kill_pid(driver_pid(jobs_of(stack).get_job_logs(body["submission_id"])), expect_in_cmdline="service.sweep.driver")
        body = wait_for_status(api, sid, {"INTERRUPTED", "SUCCEEDED", "FAILED", "CANCELLED"}, timeout=120)
        assert body["status"] == "INTERRUPTED", body.get("error")
        assert api.post(f"/studies/{sid}/resume").status_code == 200
    else:
        print(f"\n[confirm] the study ended before the driver could be killed: {body['confirmation']}")
    body = wait_for_status(api, sid, {"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"}, timeout=400)
    assert body["status"] == "SUCCEEDED", body.get("error")

    # the search was not run again: 3 trials
    assert len(optuna_trials(stack, sid)) == 3 and body["trial_counts"]["total"] == 3

    # GET /studies/{id}: every configuration with its seeds, val and test accuracy, mean +- std, difference
    conf = body["confirmation"]
    assert conf["status"] == "complete" and conf["runs_done"] == conf["runs_total"] == total
    assert conf["seeds"] == [1, 2, 3] and conf["epochs"] == 3
    labels = [c["label"] for c in conf["configurations"]]
    assert conf["reference"] in labels and conf["best"] in labels
    for c in conf["configurations"]:
        assert [r["seed"] for r in c["runs"]] == [1, 2, 3]
        assert all(0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 for r in c["runs"])
        assert c["val_acc"]["n"] == c["test_acc"]["n"] == 3 and c["test_acc"]["std"] is not None
    d = conf["difference"]
    assert d["metric"] == "test_acc" and d["diff"] is not None and d["low"] <= d["diff"] <= d["high"]
    cands = [c for c in conf["configurations"] if "candidate" in c["role"]]
    assert conf["best"] == max(cands, key=lambda c: c["val_acc"]["mean"])["label"]  # chosen on val

    # MLflow: one finished confirmation run per (configuration, seed), children of the parent run
    client = mlflow_client(stack)
    runs = child_runs(stack, body)
    confirm_runs = [c for c in runs if c.data.tags.get("bonn_sweep.stage") == "confirm"]
    finished = Counter((c.data.tags["confirm.config"], c.data.tags["confirm.seed"])
                       for c in confirm_runs if c.info.status == "FINISHED")
    assert len(finished) == total and all(n == 1 for n in finished.values()), finished
    assert all(n == 1 for n in Counter(c.data.tags["tune_trial_id"] for c in runs).values())
    assert len([c for c in runs if c.data.tags.get("bonn_sweep.stage") == "search"]) == 3
    run_ids = {r["mlflow_run_id"] for c in conf["configurations"] for r in c["runs"]}
    assert run_ids <= {c.info.run_id for c in confirm_runs}
    parent = client.get_run(body["mlflow_parent_run_id"])
    assert "confirm.best_minus_reference.test_acc_diff" in parent.data.metrics
    assert parent.data.tags["confirm_best"] == conf["best"]
    assert "confirmation/confirmation.png" in all_artifacts(client, parent.info.run_id)

    # the registered model is the confirmed run, with its test accuracy
    name, version = body["registered_model"].split("/")
    mv = client.get_model_version(name, version)
    assert mv.tags["stage"] == "confirm" and 0 <= float(mv.tags["test_acc"]) <= 1
    assert mv.run_id in run_ids

    # the CLI shows the confirmation table
    from service.launch import display
    from service.launch.cli import main

    monkeypatch.setattr(display.console, "width", 240)
    capsys.readouterr()
    assert main(["--api", stack.api_url, "studies", "show", sid]) == 0
    out = capsys.readouterr().out
    assert "confirmation over seeds" in out and "best - reference" in out and conf["best"] in out
