"""The API through TestClient, with Ray's Jobs API and MLflow replaced by stubs
(``app.dependency_overrides``) and a real Optuna storage in a temporary SQLite file. The client sends
an API key the settings accept (auth itself: tests/unit/test_security.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.backends import MlflowGateway, TrackingError
from service.api.deps import get_jobs, get_tracking
from service.api.study_service import StudyService, job_error_text, submission_id_for
from service.core.jobs import JobInfo, RayJobError, RayUnavailable
from service.core.settings import Settings
from service.core.store import StudyStatus, utcnow

API_KEY = "unit-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

SPEC = {
    "name": "digits smoke",
    "search_space": "digits-smoke",
    "budget": {"num_trials": 4, "max_concurrent_trials": 2},
    "sampler": {"type": "tpe", "seed": 0},
}


class FakeJobs:
    """Ray Jobs API stand-in: records submissions; job status settable per submission id."""

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.jobs: dict[str, JobInfo] = {}
        self.stopped: list[str] = []
        self.down = False
        self.refuse = False

    def _check(self) -> None:
        if self.down:
            raise RayUnavailable("Ray dashboard at http://127.0.0.1:1 unreachable: ConnectError")

    def version(self) -> dict[str, Any]:
        self._check()
        return {"ray_version": "2.60.0", "session_name": "fake"}

    def submit(self, **kw: Any) -> str:
        self._check()
        if self.refuse:
            raise RayJobError("job submission refused (400): bad runtime_env", 400)
        self.submitted.append(kw)
        self.jobs[kw["submission_id"]] = JobInfo(kw["submission_id"], "PENDING", metadata=kw.get("metadata"))
        return kw["submission_id"]

    def get(self, submission_id: str) -> JobInfo | None:
        self._check()
        return self.jobs.get(submission_id)

    def stop(self, submission_id: str) -> bool:
        self._check()
        if submission_id not in self.jobs:
            return False
        self.stopped.append(submission_id)
        return True

    def set(self, submission_id: str, status: str, message: str | None = None, **extra: Any) -> None:
        self.jobs[submission_id] = JobInfo(submission_id, status, message=message, start_time=1_700_000_000_000,
                                           end_time=1_700_000_100_000 if status in ("SUCCEEDED", "FAILED", "STOPPED") else None,
                                           **extra)

    def close(self) -> None:
        pass


class FakeTracking(MlflowGateway):
    """MLflow stand-in: URL building is the real one, network calls are recorded."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:5000")
        self.runs: dict[str, dict[str, Any]] = {}
        self.statuses: dict[str, list[str]] = {}
        self.down = False

    def ping(self) -> str:
        if self.down:
            raise TrackingError("MLflow at http://127.0.0.1:5000 unreachable")
        return "ok"

    def ensure_experiment(self, name: str) -> str:
        self.ping()
        return "7"

    def create_parent_run(self, experiment_id: str, **kw: Any) -> str:
        self.ping()
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {"experiment_id": experiment_id, **kw}
        return run_id

    def set_run_status(self, run_id: str, status: str) -> None:
        self.statuses.setdefault(run_id, []).append(status)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[TestClient, FakeJobs, FakeTracking, Settings]]:
    settings = Settings(home=tmp_path / "home", ray_dashboard_url="http://127.0.0.1:8265", driver_python="/py/bin/python",
                        api_keys=API_KEY)
    app = create_app(settings, reconcile=False, warm_up=False)
    jobs, tracking = FakeJobs(), FakeTracking()
    app.dependency_overrides[get_jobs] = lambda: jobs
    app.dependency_overrides[get_tracking] = lambda: tracking
    with TestClient(app, headers=AUTH) as client:
        yield client, jobs, tracking, settings


def post(client: TestClient, body: dict | None = None, **kw: Any) -> Any:
    return client.post("/studies", json=body if body is not None else SPEC, **kw)


# -- create ---------------------------------------------------------------------------------------


def test_create_submits_job_with_contract_payload(env) -> None:
    client, jobs, tracking, settings = env
    r = post(client)
    assert r.status_code == 201, r.text
    body = r.json()
    sid = body["id"]
    assert body["status"] == "PENDING" and body["name"] == "digits smoke"
    assert r.headers["location"] == f"/studies/{sid}"
    assert body["links"]["mlflow_run"] == "http://127.0.0.1:5000/#/experiments/7/runs/run0"
    assert body["links"]["ray_job"] == f"http://127.0.0.1:8265/#/jobs/bonn-sweep-{sid}"

    (sub,) = jobs.submitted
    assert sub["entrypoint"] == "/py/bin/python -m service.sweep.driver"
    assert sub["submission_id"] == f"bonn-sweep-{sid}"
    assert sub["metadata"] == {"study_id": sid, "study_name": "digits smoke", "bonn_sweep": "1"}
    env_vars = sub["runtime_env"]["env_vars"]
    assert env_vars["RAY_JOB_STOP_SIGNAL"] == "SIGINT" and env_vars["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
    payload = json.loads(env_vars["BONN_SWEEP_JOB"])
    assert set(payload) == {
        "study_id", "spec", "mlflow_tracking_uri", "experiment_id", "parent_run_id", "optuna_storage",
        "tune_storage", "resume", "num_trials",
    }
    assert payload["study_id"] == sid and payload["resume"] is False and payload["num_trials"] == 4
    assert payload["experiment_id"] == "7" and payload["parent_run_id"] == "run0"
    assert payload["optuna_storage"] == settings.optuna_storage and payload["tune_storage"] == settings.tune_storage
    assert set(payload["spec"]["search_space"]["parameters"]) == {"lam", "theta", "nu"}  # resolved inline
    assert tracking.runs["run0"]["study_id"] == sid and tracking.runs["run0"]["study_name"] == "digits smoke"


def test_ray_down_at_post_keeps_row_as_failed(env) -> None:
    client, jobs, _tracking, _ = env
    jobs.down = True
    r = post(client)
    assert r.status_code == 201
    body = r.json()
    assert body["status"] == "FAILED" and "Ray job submission failed" in body["error"]
    assert client.get(f"/studies/{body['id']}").json()["status"] == "FAILED"


def test_mlflow_down_at_post_keeps_row_as_failed(env) -> None:
    client, jobs, tracking, _ = env
    tracking.down = True
    body = post(client).json()
    assert body["status"] == "FAILED" and "MLflow" in body["error"]
    assert jobs.submitted == []


def test_idempotency_key(env) -> None:
    client, jobs, _, _ = env
    r1 = post(client, headers={"Idempotency-Key": "k1"})
    r2 = post(client, headers={"Idempotency-Key": "k1"})
    assert r1.status_code == 201 and r2.status_code == 200
    assert r1.json()["id"] == r2.json()["id"] and len(jobs.submitted) == 1
    r3 = post(client, {**SPEC, "budget": {"num_trials": 5}}, headers={"Idempotency-Key": "k1"})
    assert r3.status_code == 409
    assert r3.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert "Idempotency-Key" in r3.json()["detail"][0]["msg"]
    assert post(client, headers={"Idempotency-Key": "k2"}).json()["id"] != r1.json()["id"]


# -- errors table: status, field, message ------------------------------------------------------------

ERRORS = [
    ("unknown field", {**SPEC, "budgt": {}}, {}, 422, ["body", "budgt"], "unknown field 'budgt'"),
    ("bad preset", {**SPEC, "search_space": "nope"}, {}, 422, ["body", "search_space"], "unknown preset 'nope'"),
    (
        "low >= high inline",
        {**SPEC, "search_space": {"parameters": {"lam": {"type": "float", "low": 1.0, "high": 0.5}}}},
        {}, 422, ["body", "search_space", "parameters", "lam"], "low must be < high",
    ),
    ("unknown model in base", {**SPEC, "base": {"model": "vgg"}}, {}, 422, ["body", "base", "model"], "'vgg'"),
    ("num_trials 0", {**SPEC, "budget": {"num_trials": 0}}, {}, 422, ["body", "budget", "num_trials"], "greater than or equal to 1"),
    ("gpus negative", {**SPEC, "resources": {"gpus_per_trial": -1}}, {}, 422, ["body", "resources", "gpus_per_trial"], "greater than or equal to 0"),
    ("grid on continuous", {**SPEC, "sampler": {"type": "grid"}}, {}, 422, ["body", "sampler", "type"], "grid"),
]


@pytest.mark.parametrize("case, body, headers, status, loc, msg", ERRORS, ids=[e[0] for e in ERRORS])
def test_post_errors(env, case, body, headers, status, loc, msg) -> None:
    client, jobs, _, _ = env
    r = post(client, body, headers=headers)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert all(set(d) == {"loc", "msg", "type"} for d in detail)
    hit = [d for d in detail if d["loc"][: len(loc)] == loc]
    assert hit and msg in hit[0]["msg"], detail
    assert jobs.submitted == []


def test_malformed_json_is_422(env) -> None:
    client, _, _, _ = env
    r = client.post("/studies", content=b'{"name": "x", ', headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "malformed JSON" in r.json()["detail"][0]["msg"]


def test_wrong_content_type_is_415(env) -> None:
    client, _, _, _ = env
    r = client.post("/studies", content=json.dumps(SPEC), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["detail"][0]["loc"] == ["header", "Content-Type"]
    assert "application/json" in r.json()["detail"][0]["msg"]


def test_unknown_id_is_404(env) -> None:
    client, _, _, _ = env
    for r in (
        client.get("/studies/nope"),
        client.get("/studies/nope/trials"),
        client.post("/studies/nope/cancel"),
        client.post("/studies/nope/resume"),
    ):
        assert r.status_code == 404
        assert r.json()["detail"][0]["loc"] == ["path", "study_id"] and "nope" in r.json()["detail"][0]["msg"]
    assert client.get("/no/such/route").status_code == 404


def test_cancel_finished_is_409(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    jobs.set(submission_id_for(sid), "SUCCEEDED")
    assert client.get(f"/studies/{sid}").json()["status"] == "SUCCEEDED"
    r = client.post(f"/studies/{sid}/cancel")
    assert r.status_code == 409 and "SUCCEEDED" in r.json()["detail"][0]["msg"]


def test_resume_running_is_409(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    jobs.set(submission_id_for(sid), "RUNNING")
    r = client.post(f"/studies/{sid}/resume")
    assert r.status_code == 409 and "RUNNING" in r.json()["detail"][0]["msg"]


def test_bad_query_params_are_422(env) -> None:
    client, _, _, _ = env
    assert client.get("/studies?status=DONE").status_code == 422
    assert client.get("/studies?limit=0").status_code == 422
    assert client.get("/studies?offset=-1").status_code == 422


def test_unexpected_error_is_json_503_not_500(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]

    def boom(_sid: str) -> None:
        raise ZeroDivisionError("bug")

    jobs.get = boom  # type: ignore[method-assign]
    client_no_raise = TestClient(client.app, raise_server_exceptions=False, headers=AUTH)
    r = client_no_raise.get(f"/studies/{sid}")
    assert r.status_code == 503
    assert "internal error (ZeroDivisionError)" in r.json()["detail"][0]["msg"]


# -- lifecycle ---------------------------------------------------------------------------------------


def test_status_follows_ray_job(env) -> None:
    client, jobs, tracking, _ = env
    sid = post(client).json()["id"]
    sub = submission_id_for(sid)
    jobs.set(sub, "RUNNING")
    body = client.get(f"/studies/{sid}").json()
    assert body["status"] == "RUNNING" and body["started_at"] is not None
    jobs.set(sub, "FAILED", message="Job entrypoint command failed with exit code 1\n\x1b[36mboom\x1b[0m")
    body = client.get(f"/studies/{sid}").json()
    assert body["status"] == "FAILED" and "\x1b" not in body["error"] and "exit code 1" in body["error"]
    assert body["finished_at"] is not None
    assert tracking.statuses["run0"] == ["FAILED"]


def test_cancel_then_resume(env) -> None:
    client, jobs, tracking, _ = env
    sid = post(client).json()["id"]
    sub = submission_id_for(sid)
    jobs.set(sub, "RUNNING")
    r = client.post(f"/studies/{sid}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "STOPPING"
    assert jobs.stopped == [sub]
    assert client.post(f"/studies/{sid}/cancel").json()["status"] == "STOPPING"  # idempotent while stopping
    assert client.get(f"/studies/{sid}").json()["status"] == "STOPPING"  # job still RUNNING
    jobs.set(sub, "STOPPED")
    assert client.get(f"/studies/{sid}").json()["status"] == "CANCELLED"
    assert tracking.statuses["run0"] == ["KILLED"]

    r = client.post(f"/studies/{sid}/resume", json={"num_trials": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "PENDING" and body["num_trials"] == 6 and body["resume_count"] == 1
    assert body["submission_id"] == f"bonn-sweep-{sid}-r1"
    payload = json.loads(jobs.submitted[-1]["runtime_env"]["env_vars"]["BONN_SWEEP_JOB"])
    assert payload["resume"] is True and payload["num_trials"] == 6 and payload["parent_run_id"] == "run0"
    assert payload["spec"]["budget"]["num_trials"] == 6
    assert tracking.statuses["run0"] == ["KILLED", "RUNNING"]
    assert len(tracking.runs) == 1  # same parent run

    # second cancel/resume -> -r2
    jobs.set(f"bonn-sweep-{sid}-r1", "STOPPED")
    assert client.get(f"/studies/{sid}").json()["status"] == "CANCELLED"
    assert client.post(f"/studies/{sid}/resume").json()["submission_id"] == f"bonn-sweep-{sid}-r2"


def test_resume_body_is_validated(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    jobs.set(submission_id_for(sid), "STOPPED")
    r = client.post(f"/studies/{sid}/resume", json={"num_trial": 3})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "num_trial"]
    r = client.post(f"/studies/{sid}/resume", json={"num_trials": 0})
    assert r.status_code == 422


def test_resume_when_ray_down_is_503_and_study_stays_failed(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    jobs.set(submission_id_for(sid), "FAILED", message="x")
    assert client.get(f"/studies/{sid}").json()["status"] == "FAILED"
    jobs.down = True
    r = client.post(f"/studies/{sid}/resume")
    assert r.status_code == 503 and "unreachable" in r.json()["detail"][0]["msg"]
    jobs.down = False
    assert client.get(f"/studies/{sid}").json()["status"] == "FAILED"
    jobs.refuse = True  # Ray answers but refuses the submission
    r = client.post(f"/studies/{sid}/resume")
    assert r.status_code == 503 and "submission failed" in r.json()["detail"][0]["msg"]
    body = client.get(f"/studies/{sid}").json()
    assert body["status"] == "FAILED" and "submission failed" in body["error"]
    jobs.refuse = False
    assert client.post(f"/studies/{sid}/resume").status_code == 200


def test_lost_job_after_cluster_restart_interrupts_study(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    service: StudyService = _service(client, jobs)
    service.store.update(sid, submitted_at=utcnow() - timedelta(minutes=5))
    jobs.jobs.clear()  # the head restarted: it knows no jobs
    body = client.get(f"/studies/{sid}").json()
    assert body["status"] == "INTERRUPTED" and "no longer exists" in body["error"]
    assert client.post(f"/studies/{sid}/resume").status_code == 200


@pytest.mark.parametrize(("exit_code", "error_type", "status", "says"), [
    (-9, "JOB_ENTRYPOINT_COMMAND_ERROR", "INTERRUPTED", "killed by signal SIGKILL"),
    (137, "JOB_ENTRYPOINT_COMMAND_ERROR", "INTERRUPTED", "killed by signal SIGKILL (exit code 137)"),
    (None, "JOB_SUPERVISOR_ACTOR_DIED", "INTERRUPTED", "lost (JOB_SUPERVISOR_ACTOR_DIED)"),
    (1, "JOB_ENTRYPOINT_COMMAND_ERROR", "FAILED", "exit code 1"),  # the driver failed the study itself
])
def test_killed_driver_interrupts_study_and_resume_continues_it(env, exit_code, error_type, status, says) -> None:
    client, jobs, tracking, _ = env
    sid = post(client).json()["id"]
    sub = submission_id_for(sid)
    jobs.set(sub, "RUNNING")
    jobs.set(sub, "FAILED", message=f"Job entrypoint command failed with exit code {exit_code}",
             driver_exit_code=exit_code, error_type=error_type)
    body = client.get(f"/studies/{sid}").json()
    assert body["status"] == status and says in body["error"], body["error"]
    assert tracking.statuses["run0"] == ["KILLED" if status == "INTERRUPTED" else "FAILED"]
    if status == "INTERRUPTED":
        assert f"POST /studies/{sid}/resume" in body["error"]
    assert client.post(f"/studies/{sid}/cancel").status_code == 409
    r = client.post(f"/studies/{sid}/resume")
    assert r.status_code == 200 and r.json()["status"] == "PENDING" and r.json()["resume_count"] == 1, r.text
    assert json.loads(jobs.submitted[-1]["runtime_env"]["env_vars"]["BONN_SWEEP_JOB"])["resume"] is True


def test_reconcile_active_moves_studies_without_reads(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    jobs.set(submission_id_for(sid), "SUCCEEDED")
    service = _service(client, jobs)
    assert service.store.get(sid).status == "PENDING"
    assert service.reconcile_active() == 1
    assert service.store.get(sid).status == "SUCCEEDED"


def _service(client: TestClient, jobs: FakeJobs) -> StudyService:
    st = client.app.state
    return StudyService(st.settings, st.store, jobs, FakeTracking(), st.trials)


# -- reads ------------------------------------------------------------------------------------------


def test_list_pagination_and_filter(env) -> None:
    client, jobs, _, _ = env
    ids = [post(client, {**SPEC, "name": f"s{i}"}).json()["id"] for i in range(5)]
    jobs.set(submission_id_for(ids[0]), "SUCCEEDED")
    page = client.get("/studies?limit=2&offset=0").json()
    assert page["count"] == 5 and len(page["data"]) == 2 and page["limit"] == 2
    assert [s["id"] for s in page["data"]] == ids[::-1][:2]  # newest first
    rest = client.get("/studies?limit=10&offset=2").json()
    assert len(rest["data"]) == 3
    done = client.get("/studies?status=SUCCEEDED").json()
    assert [s["id"] for s in done["data"]] == [ids[0]] and done["count"] == 1
    assert client.get("/studies?status=PENDING").json()["count"] == 4


def test_trial_counts_best_trial_and_trials(env) -> None:
    client, _, _, settings = env
    sid = post(client).json()["id"]
    study = optuna.create_study(study_name=sid, storage=settings.optuna_storage, direction="maximize")
    d = optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)

    def add(value: float | None, state: optuna.trial.TrialState, **attrs: Any) -> None:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lam": 1e-4}, distributions={"lam": d}, value=value, state=state, user_attrs=attrs
            )
        )

    add(0.80, optuna.trial.TrialState.COMPLETE, mlflow_run_id="r0", best_epoch=3, checkpoint_uri="file:///c0",
        tune_trial_id="t0", epochs_done=3, stop_reason="completed")
    add(0.95, optuna.trial.TrialState.PRUNED, mlflow_run_id="r1", stop_reason="early_stopped")  # pruned: never best
    add(0.90, optuna.trial.TrialState.COMPLETE, mlflow_run_id="r2", best_epoch=2, checkpoint_uri="file:///c2")
    add(None, optuna.trial.TrialState.FAIL, stop_reason="error")
    study.set_user_attr("registered_model", {"name": "bonn-digits", "version": 1})

    body = client.get(f"/studies/{sid}").json()
    assert body["trial_counts"] == {"complete": 2, "pruned": 1, "failed": 1, "running": 0, "waiting": 0, "total": 4}
    best = body["best_trial"]
    assert best["number"] == 2 and best["value"] == 0.90 and best["epoch"] == 2
    assert best["mlflow_run_id"] == "r2" and best["checkpoint_uri"] == "file:///c2" and best["params"] == {"lam": 1e-4}
    assert body["registered_model"] == {"name": "bonn-digits", "version": 1}

    trials = client.get(f"/studies/{sid}/trials").json()
    assert trials["count"] == 4
    t0 = trials["data"][0]
    assert t0["mlflow_run_id"] == "r0" and t0["epochs_done"] == 3 and t0["stop_reason"] == "completed"
    assert client.get(f"/studies/{sid}/trials?state=pruned").json()["count"] == 1


def test_min_objective_best_trial(env) -> None:
    client, _, _, settings = env
    sid = post(client, {**SPEC, "objective": {"metric": "val_loss", "mode": "min"}}).json()["id"]
    study = optuna.create_study(study_name=sid, storage=settings.optuna_storage, direction="minimize")
    d = optuna.distributions.FloatDistribution(0, 1)
    for v in (0.5, 0.2, 0.7):
        study.add_trial(optuna.trial.create_trial(params={"lam": v}, distributions={"lam": d}, value=v))
    assert client.get(f"/studies/{sid}").json()["best_trial"]["value"] == 0.2


# -- health -------------------------------------------------------------------------------------------


def test_healthz(env) -> None:
    client, jobs, tracking, _ = env
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert set(r.json()["components"]) == {"ray", "mlflow", "store", "optuna"}
    jobs.down = True
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["components"]["ray"]["ok"] is False
    assert "unreachable" in r.json()["components"]["ray"]["detail"]
    jobs.down, tracking.down = False, True
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["components"]["mlflow"]["ok"] is False


def test_job_error_text_prefers_driver_line() -> None:
    msg = "Job entrypoint command failed with exit code 1, last logs:\nnoise\n[bonn-sweep 12:00] study x FAILED: bad\nmore"
    assert job_error_text(msg).startswith("[bonn-sweep 12:00] study x FAILED: bad")


def test_openapi_docs(env) -> None:
    client, _, _, _ = env
    schema = client.get("/openapi.json").json()
    assert "/studies" in schema["paths"] and "/studies/{study_id}/resume" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_statuses_enum_terminal() -> None:
    assert StudyStatus.CANCELLED.is_terminal and not StudyStatus.STOPPING.is_terminal


# -- architecture: the API never imports ray ---------------------------------------------------------


def test_api_process_never_imports_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.api.app import create_app\n"
        "from service.core.settings import Settings\n"
        f"s = Settings(home={str(tmp_path / 'h')!r}, ray_dashboard_url='http://127.0.0.1:9', "
        "mlflow_tracking_uri='http://127.0.0.1:9', api_keys='k')\n"
        "with TestClient(create_app(s, reconcile=False), headers={'Authorization': 'Bearer k'}) as c:\n"
        "    assert c.get('/healthz').status_code == 503\n"
        "    assert c.post('/studies', json={'name': 'x', 'search_space': 'digits-smoke'}).status_code == 201\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


# -- CLI helpers (the HTTP paths are covered against the real stack in tests/integration) ------------


def test_cli_parse_set_and_build_spec(tmp_path: Path) -> None:
    import argparse

    from service.launch.cli_errors import CliError
    from service.launch.study_commands import build_spec, parse_set

    assert parse_set(["epochs=4", "budget.num_trials=8", "lr=1e-3", "hist_epochs=[0, 2]"]) == {
        "base": {"epochs": 4, "lr": 1e-3, "hist_epochs": [0, 2]},
        "budget": {"num_trials": 8},
    }
    with pytest.raises(CliError):
        parse_set(["epochs"])
    ns = argparse.Namespace(file=None, preset="digits-smoke", name=None, trials=0, set=["epochs=2"])
    assert build_spec(ns) == {"name": "digits-smoke", "search_space": "digits-smoke", "budget": {"num_trials": 0},
                              "base": {"epochs": 2}}
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  lam: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}\n"
                     "fixed: {model: small_cnn, dataset: digits}\n")
    study = tmp_path / "study.yaml"
    study.write_text("name: from-file\nsearch_space: space.yaml\nbase: {epochs: 1}\n")
    spec = build_spec(argparse.Namespace(file=str(study), preset=None, name="renamed", trials=3, set=None))
    assert spec["name"] == "renamed" and spec["budget"] == {"num_trials": 3}
    assert spec["search_space"]["parameters"]["lam"]["type"] == "float"  # loaded client-side, sent inline
    with pytest.raises(CliError):
        build_spec(argparse.Namespace(file=None, preset=None, name=None, trials=None, set=None))


def test_cli_error_lines_and_command_index() -> None:
    import httpx

    from service.launch.cli import command_index as _command_index
    from service.launch.cli_errors import error_lines

    r = httpx.Response(422, json={"detail": [{"loc": ["body", "budget", "num_trials"], "msg": "too small", "type": "x"},
                                             {"loc": ["body", "base", "model"], "msg": "unknown", "type": "y"}]})
    assert error_lines(r) == ["HTTP 422: budget.num_trials: too small", "HTTP 422: base.model: unknown"]
    assert error_lines(httpx.Response(502, text="<html>")) == ["HTTP 502: <html>"]
    assert _command_index(["--api", "http://x", "spaces", "list"]) == 2
    assert _command_index(["--home", "h", "studies", "list"]) == 2
    assert _command_index(["--help"]) is None


def test_cli_unknown_api_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    from service.launch.cli import main

    assert main(["--api", "http://127.0.0.1:9", "studies", "list"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the API" in err and "Traceback" not in err
    assert main(["spaces", "list"]) == 0


def test_cancel_racing_the_job_end_is_409(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    sub = submission_id_for(sid)
    jobs.set(sub, "RUNNING")
    assert client.get(f"/studies/{sid}").json()["status"] == "RUNNING"
    jobs.set(sub, "SUCCEEDED")
    jobs.stop = lambda _sub: False  # type: ignore[method-assign]  # Ray: nothing to stop any more
    service = _service(client, jobs)
    service.store.update(sid, status=StudyStatus.RUNNING)  # the API has not seen the end yet
    r = client.post(f"/studies/{sid}/cancel")
    assert r.status_code == 409 and "SUCCEEDED" in r.json()["detail"][0]["msg"]


def test_reconcile_during_resume_does_not_apply_the_old_jobs_end(env) -> None:
    """The background loop may run while resume submits: the previous job's STOPPED must not turn
    the resumed study back into CANCELLED."""
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    jobs.set(submission_id_for(sid), "STOPPED")
    assert client.get(f"/studies/{sid}").json()["status"] == "CANCELLED"
    service = _service(client, jobs)
    real_submit = jobs.submit

    def submit_with_concurrent_reconcile(**kw: Any) -> str:
        row = service.store.get(sid)
        assert row.status == "PENDING" and row.submission_id == f"bonn-sweep-{sid}-r1" and row.submitted_at is None
        service.reconcile_active()  # the loop, mid-resume
        assert service.store.get(sid).status == "PENDING"
        return real_submit(**kw)

    jobs.submit = submit_with_concurrent_reconcile  # type: ignore[method-assign]
    body = client.post(f"/studies/{sid}/resume").json()
    assert body["status"] == "PENDING" and body["submission_id"] == f"bonn-sweep-{sid}-r1"
    assert client.get(f"/studies/{sid}").json()["status"] == "PENDING"


def test_stale_reconcile_cannot_end_a_newer_submission(env) -> None:
    client, jobs, _, _ = env
    sid = post(client).json()["id"]
    service = _service(client, jobs)
    stale = service.store.get(sid)  # read with the first submission
    jobs.set(submission_id_for(sid), "STOPPED")
    service.store.update(sid, submission_id=f"bonn-sweep-{sid}-r1")  # meanwhile: resumed
    jobs.set(f"bonn-sweep-{sid}-r1", "RUNNING")
    assert service.reconcile(stale).status != "CANCELLED"
    assert service.store.get(sid).status == "PENDING"
