"""service.sweep.analysis.StudyAnalysis: the plots reach the parent run, and a refresh while MLflow is
unreachable is skipped at once (no REST timeout waited out, nothing raised into the sweep)."""

from __future__ import annotations

import socket
import time

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("ray")
pytest.importorskip("mlflow")

from service.sweep.analysis import StudyAnalysis  # noqa: E402
from tests.unit.test_study_plots import make_study  # noqa: E402


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refresh_while_mlflow_is_down_is_skipped_at_once():
    said = []
    analysis = StudyAnalysis(f"http://127.0.0.1:{_closed_port()}", "run-id", echo=said.append)
    t0 = time.monotonic()
    assert analysis.log(make_study()) is None
    assert time.monotonic() - t0 < 3.0
    assert analysis.skipped == 1 and "unreachable" in said[-1]


def test_the_offline_state_of_the_callback_is_asked_first():
    said, asked = [], []
    analysis = StudyAnalysis("http://mlflow.invalid:5000", "run-id", echo=said.append,
                             online=lambda: asked.append(1) or False)
    assert analysis.log(make_study(), final=True) is None
    assert asked == [1] and "(final) skipped" in said[-1]


def test_plots_and_importances_reach_the_parent_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("analysis", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    said = []
    res = StudyAnalysis(uri, run.info.run_id, echo=said.append).log(make_study())
    assert res is not None and res["plots"], said
    names = {f.path for f in client.list_artifacts(run.info.run_id, "analysis")}
    assert {"analysis/study.html", "analysis/importances.json", "analysis/slice.png"} <= names
    metrics = client.get_run(run.info.run_id).data.metrics
    assert set(metrics) == {f"importance.{k}" for k in res["importances"]}
