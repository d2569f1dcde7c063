"""The API's two read/write gateways besides Ray: MLflow (experiment + parent run) and Optuna (trials).

The parent run itself is :class:`service.core.parent_run.ParentRun` (shared with the study driver);
:class:`MlflowGateway` uses it with one attempt per call, so the API answers fast when MLflow is down.

Both are small classes so unit tests can swap them (``app.dependency_overrides``) for stubs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from service.core.mlflow_calls import TrackingError, short_error
from service.core.parent_run import ParentRun

log = logging.getLogger(__name__)

# The API must answer fast when MLflow is down, not after MLflow's default 7 retries with backoff.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class MlflowGateway:
    """Creates the study's experiment and parent run; finishes the parent run when the study ends."""

    def __init__(self, tracking_uri: str, ui_url: str | None = None) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self.ui_url = (ui_url or tracking_uri).rstrip("/")
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def ping(self) -> str:
        if not self.tracking_uri.startswith("http"):
            return f"{self.tracking_uri} (local store)"
        try:
            r = httpx.get(f"{self.tracking_uri}/health", timeout=3.0)
        except httpx.HTTPError as exc:
            raise TrackingError(f"MLflow at {self.tracking_uri} unreachable: {exc}") from exc
        if r.status_code != 200:
            raise TrackingError(f"MLflow /health -> {r.status_code}")
        return "ok"

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment ``name``, created (or restored from deleted) if needed."""
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    return self.client.create_experiment(name, tags={"bonn_sweep": "1"})
                except Exception:  # noqa: BLE001 - created concurrently by another request
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - MlflowException, requests errors
            raise TrackingError(f"MLflow experiment {name!r}: {short_error(exc)}") from exc

    def create_parent_run(
        self, experiment_id: str, *, study_id: str, study_name: str, spec: dict[str, Any], resolved_space: dict
    ) -> str:
        return self.parent_run(None).create(experiment_id, study_id=study_id, study_name=study_name, spec=spec,
                                            resolved_space=resolved_space)

    def set_run_status(self, run_id: str, status: str) -> None:
        """``RUNNING`` (resume) or a final status (FINISHED / FAILED / KILLED) if the run is not final yet."""
        self.parent_run(run_id).set_status(status)

    def parent_run(self, run_id: str | None) -> ParentRun:
        """A study's parent run through this gateway's client (one attempt per call; errors raise)."""
        return ParentRun(self.tracking_uri, run_id, client=self.client, tries=1)

    def run_url(self, experiment_id: str | None, run_id: str | None) -> str | None:
        if not experiment_id or not run_id:
            return None
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"

    def experiment_url(self, experiment_id: str | None) -> str | None:
        return f"{self.ui_url}/#/experiments/{experiment_id}" if experiment_id else None


# -- Optuna -------------------------------------------------------------------------------------------

TRIAL_ATTRS = (
    "tune_trial_id",
    "mlflow_run_id",
    "epochs_done",
    "best_value",
    "best_epoch",
    "last_value",
    "flip_frac",
    "flip_frac_init",
    "bimodality",
    "checkpoint_uri",
    "stop_reason",
    "error",
)


@dataclass
class TrialView:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    user_attrs: dict[str, Any]
    datetime_start: datetime | None
    datetime_complete: datetime | None
    values: list[float] | None = None  # a multi-objective trial's values (value = values[0])

    @property
    def duration_s(self) -> float | None:
        if self.datetime_start and self.datetime_complete:
            return (self.datetime_complete - self.datetime_start).total_seconds()
        return None


@dataclass
class StudyView:
    exists: bool
    trials: list[TrialView] = field(default_factory=list)
    user_attrs: dict[str, Any] = field(default_factory=dict)
    optuna_study_id: int | None = None  # the storage's numeric id (optuna-dashboard's URLs use it)

    def counts(self) -> dict[str, int]:
        c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
        key = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
        for t in self.trials:
            c[key.get(t.state, "waiting")] += 1
        c["total"] = len(self.trials)
        return c

    def best(self, mode: str) -> TrialView | None:
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        if not done:
            return None
        pick = max if mode == "max" else min
        return pick(done, key=lambda t: (t.value, -t.number) if mode == "max" else (t.value, t.number))


class OptunaReader:
    """Reads the trials the driver wrote into Optuna's RDB storage (study name = study id)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._storage: Any = None

    @property
    def storage(self) -> Any:
        if self._storage is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            kwargs: dict[str, Any] = {}
            if self.url.startswith("sqlite"):
                kwargs["engine_kwargs"] = {"connect_args": {"timeout": 30}}
            self._storage = optuna.storages.RDBStorage(self.url, **kwargs)
        return self._storage

    def ping(self) -> str:
        self.storage.get_all_studies()
        return "ok"

    def study(self, study_id: str) -> StudyView:
        st = self.storage
        try:
            sid = st.get_study_id_from_name(study_id)
        except KeyError:
            return StudyView(exists=False)
        trials = [
            TrialView(
                number=t.number,
                state=t.state.name,
                value=t.values[0] if t.values else None,  # multi-objective: the primary objective
                params=dict(t.params),
                user_attrs=dict(t.user_attrs),
                datetime_start=_utc(t.datetime_start),
                datetime_complete=_utc(t.datetime_complete),
                values=list(t.values) if t.values is not None and len(t.values) > 1 else None,
            )
            for t in st.get_all_trials(sid, deepcopy=False)
        ]
        return StudyView(exists=True, trials=trials, user_attrs=dict(st.get_study_user_attrs(sid)), optuna_study_id=sid)


def pareto_front(trials: list[TrialView], modes: list[str]) -> list[TrialView]:
    """The complete trials no other complete trial dominates (better or equal in every objective,
    better in one), by number."""
    done = [t for t in trials if t.state == "COMPLETE" and t.values and len(t.values) == len(modes)]
    sign = [1.0 if m == "max" else -1.0 for m in modes]

    def dominates(a: TrialView, b: TrialView) -> bool:
        pa = [s * v for s, v in zip(sign, a.values or [])]
        pb = [s * v for s, v in zip(sign, b.values or [])]
        return all(x >= y for x, y in zip(pa, pb)) and any(x > y for x, y in zip(pa, pb))

    return sorted((t for t in done if not any(dominates(o, t) for o in done)), key=lambda t: t.number)


def _utc(dt: datetime | None) -> datetime | None:
    """Optuna stores naive local times (``datetime.now()``): make them aware, in UTC."""
    return dt.astimezone(UTC) if dt is not None else None
