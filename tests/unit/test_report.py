"""The study report (service.core.report) through the API (TestClient, Ray and MLflow stubbed), and
the optuna-dashboard link of a study."""

from __future__ import annotations

import json
import re

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("plotly")

from fastapi.testclient import TestClient  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.api.deps import get_jobs, get_tracking  # noqa: E402
from service.core.settings import Settings  # noqa: E402
from tests.unit.test_api_unit import API_KEY, AUTH, FakeJobs, FakeTracking, post  # noqa: E402

WARM = {"lam": 1e-4, "theta": 1e-3, "nu": 1e-4}


@pytest.fixture
def client(tmp_path):
    settings = Settings(home=tmp_path / "home", ray_dashboard_url="http://127.0.0.1:8265", driver_python="/py",
                        api_keys=API_KEY, optuna_dashboard_url="http://127.0.0.1:8080")
    app = create_app(settings, reconcile=False, warm_up=False)
    app.dependency_overrides[get_jobs] = FakeJobs
    app.dependency_overrides[get_tracking] = FakeTracking
    with TestClient(app, headers=AUTH) as c:
        c.settings = settings
        yield c


def _fill(sid: str, storage: str) -> None:
    study = optuna.create_study(study_name=sid, storage=storage, direction="maximize")
    d = optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True)
    points = [WARM, {"lam": 1e-3, "theta": 1e-2, "nu": 1e-5}, {"lam": 1e-5, "theta": 1e-4, "nu": 1e-3},
              {"lam": 3e-4, "theta": 3e-3, "nu": 3e-4}, {"lam": 3e-2, "theta": 1e-5, "nu": 1e-6}]
    for i, p in enumerate(points):
        value = 0.7 + 0.05 * i
        state = optuna.trial.TrialState.PRUNED if i == 2 else optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(
            params=p, distributions={k: d for k in p}, value=None if i == 2 else value, state=state,
            intermediate_values={1: value - 0.1, 2: value} if i != 2 else {1: value - 0.2},
            user_attrs={"best_epoch": 2, "epochs_done": 2 if i != 2 else 1, "mlflow_run_id": f"r{i}"}))


def test_report_json_and_html(client) -> None:
    sid = post(client).json()["id"]
    _fill(sid, client.settings.optuna_storage)

    body = client.get(f"/studies/{sid}/report").json()
    assert body["study"]["id"] == sid and body["objective"]["metric"] == "val_acc"
    assert body["spec"]["search_space"] == "digits-smoke"
    assert [t["number"] for t in body["trials"]] == [0, 1, 2, 3, 4]
    assert body["best_trial"]["number"] == 4
    assert body["warm_start"]["params"] == WARM and body["warm_start"]["trial"]["number"] == 0
    assert set(body["importances"]) == {"lam", "theta", "nu"}
    assert body["confirmation"] is None  # a place for the confirmation stage's result
    assert body["links"]["optuna_dashboard"].startswith("http://127.0.0.1:8080/dashboard/studies/")
    assert "plots_html" not in body

    r = client.get(f"/studies/{sid}/report?format=html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "contour", "slice",
                 "intermediate_values"):
        assert f'id="plot-{name}"' in page, name
    assert "paper&#x27;s warm-start point" in page and "pruned (ASHA)" in page
    assert "<script src" not in page and "Plotly" in page  # plotly.js inlined: the page needs no network
    data = json.loads(re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S)
                      .group(1).replace("<\\/", "</"))
    assert data["study"]["id"] == sid and data["plots"][0] == "optimization_history"


def test_report_of_a_study_without_trials_and_bad_requests(client) -> None:
    sid = post(client).json()["id"]
    body = client.get(f"/studies/{sid}/report").json()
    assert body["trials"] == [] and body["best_trial"] is None and body["warm_start"]["trial"] is None
    assert "no plots" in client.get(f"/studies/{sid}/report?format=html").text
    r = client.get(f"/studies/{sid}/report?format=pdf")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "format"]
    assert client.get("/studies/nope/report").status_code == 404


def test_study_links_to_optuna_dashboard(client) -> None:
    sid = post(client).json()["id"]
    assert client.get(f"/studies/{sid}").json()["links"]["optuna_dashboard"] == "http://127.0.0.1:8080/dashboard"
    _fill(sid, client.settings.optuna_storage)
    link = client.get(f"/studies/{sid}").json()["links"]["optuna_dashboard"]
    assert re.fullmatch(r"http://127\.0\.0\.1:8080/dashboard/studies/\d+", link)


def test_multi_objective_study_shows_values_and_pareto_front(client) -> None:
    from tests.unit.test_api_unit import SPEC

    body = {**SPEC, "objective": {"metric": "val_acc", "mode": "max",
                                  "also": [{"metric": "epoch_time_s", "mode": "min"}]}}
    created = post(client, body).json()
    assert created["spec"]["scheduler"]["type"] == "fifo"
    sid = created["id"]
    study = optuna.create_study(study_name=sid, storage=client.settings.optuna_storage,
                                directions=["maximize", "minimize"])
    study.set_user_attr("objective_names", ["val_acc", "epoch_time_s"])
    d = optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True)
    # (val_acc, epoch_time_s): #0 and #2 and #3 are Pareto-optimal, #1 is dominated by #0
    for i, vals in enumerate([(0.9, 2.0), (0.8, 3.0), (0.7, 1.0), (0.95, 5.0)]):
        study.add_trial(optuna.trial.create_trial(params={"lam": 10.0 ** -(i + 2), "theta": 1e-3}, values=list(vals),
                                                  distributions={"lam": d, "theta": d}))
    body = client.get(f"/studies/{sid}").json()
    assert [p["number"] for p in body["pareto_front"]] == [0, 2, 3]
    assert body["pareto_front"][0]["values"] == [0.9, 2.0]
    assert body["best_trial"]["number"] == 3 and body["best_trial"]["value"] == 0.95  # the primary objective
    trials = client.get(f"/studies/{sid}/trials").json()["data"]
    assert trials[1]["values"] == [0.8, 3.0] and trials[1]["value"] == 0.8
    assert body["objective"]["also"] == [{"metric": "epoch_time_s", "mode": "min"}]

    report = client.get(f"/studies/{sid}/report").json()
    assert [p["number"] for p in report["pareto_front"]] == [0, 2, 3]
    page = client.get(f"/studies/{sid}/report?format=html").text
    assert "Pareto front" in page and 'id="plot-pareto_front"' in page
