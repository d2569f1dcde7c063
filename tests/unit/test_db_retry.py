"""The driver's side of a database restart and of a driver kill: Optuna storage calls retry on a lost
connection only (service/sweep/db_retry.py), the retrying storage pickles (Tune saves the searcher),
and Tune's state is saved about every second (tuner.save_tune_state_often)."""

from __future__ import annotations

import pickle

import optuna
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from service.sweep import db_retry
from service.sweep.db_retry import RetryingRDBStorage, _retrying, is_connection_error
from service.sweep.tuner import save_tune_state_often


def test_lost_connections_are_retried_other_errors_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_retry.time, "sleep", lambda _s: None)
    calls: list[int] = []

    def flaky(_self: object) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return 42

    assert _retrying(flaky)(None) == 42 and len(calls) == 3

    def broken(_self: object) -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        _retrying(broken)(None)
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = OperationalError("COMMIT", {}, Exception("server closed the connection"))
    assert is_connection_error(wrapped) and not is_connection_error(ValueError("x"))


def test_retry_window_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BONN_SWEEP_DB_RETRY_S", "0")

    def down(_self: object) -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        _retrying(down)(None)


def test_retrying_storage_works_and_pickles(tmp_path) -> None:  # noqa: ANN001
    storage = RetryingRDBStorage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = pickle.loads(pickle.dumps(study))
    assert len(again.get_trials()) == 2
    assert RetryingRDBStorage.create_new_trial is not optuna.storages.RDBStorage.create_new_trial


def test_tune_state_saved_about_every_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    monkeypatch.delenv("BONN_SWEEP_TUNE_STATE_PERIOD_S", raising=False)
    monkeypatch.delenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", raising=False)
    assert save_tune_state_often() == "1"
    import os

    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "1"
    assert os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"  # snapshots are by design
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "30")  # the operator's value wins
    assert save_tune_state_often() == "30"
