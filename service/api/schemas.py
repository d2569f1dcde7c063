"""Request / response models (``*Create`` in, ``*Public`` out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.core.spec import StudySpec
from service.core.store import StudyStatus

StudyCreate = StudySpec  # the request body of POST /studies


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    num_trials: int | None = Field(None, ge=1, description="new total number of trials (extends the study)")


class Links(BaseModel):
    mlflow_run: str | None = Field(None, description="MLflow UI page of the study's parent run")
    mlflow_experiment: str | None = None
    ray_job: str | None = Field(None, description="Ray dashboard page of the study's current job")
    optuna_dashboard: str | None = Field(None, description="optuna-dashboard page of the study (when one is set up)")


class TrialCounts(BaseModel):
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    total: int = 0


class BestTrial(BaseModel):
    number: int
    params: dict[str, Any]
    value: float | None
    epoch: int | None = Field(None, description="epoch of the best value")
    mlflow_run_id: str | None = None
    checkpoint_uri: str | None = None
    tune_trial_id: str | None = None


class ConfirmStat(BaseModel):
    mean: float | None = None
    std: float | None = Field(None, description="sample standard deviation (n - 1); null for fewer than 2 runs")
    n: int = 0


class ConfirmRun(BaseModel):
    seed: int
    val_acc: float | None = None
    test_acc: float | None = Field(None, description="the test split, evaluated once at the run's last epoch")
    mlflow_run_id: str | None = None
    tune_trial_id: str | None = None


class ConfirmConfiguration(BaseModel):
    label: str = Field(description="`trial #N` (a search trial) or `reference` (the space's warm-start point)")
    role: str = Field(description="candidate | reference | candidate+reference")
    trial: int | None = Field(None, description="the search trial it comes from")
    params: dict[str, Any]
    search_value: float | None = Field(None, description="the objective value of the search trial")
    runs: list[ConfirmRun]
    val_acc: ConfirmStat
    test_acc: ConfirmStat


class ConfirmDifference(BaseModel):
    metric: str
    diff: float | None = Field(None, description="mean(best) - mean(reference)")
    low: float | None = None
    high: float | None = None
    df: float | None = None
    se: float | None = None
    level: float = 0.95
    method: str


class Confirmation(BaseModel):
    status: str = Field(description="running | complete | incomplete (the stage ended with runs missing)")
    seeds: list[int]
    epochs: int | None = None
    experiment: str | None = Field(None, description="the Tune experiment of the confirmation runs")
    runs_done: int = 0
    runs_total: int = 0
    configurations: list[ConfirmConfiguration]
    best: str | None = Field(None, description="the candidate with the highest mean val_acc (never chosen on test)")
    reference: str | None = None
    difference: ConfirmDifference | None = Field(None, description="best - reference on test_acc, 95% interval")
    difference_val: ConfirmDifference | None = Field(None, description="best - reference on val_acc")


class StudySummary(BaseModel):
    id: str
    name: str
    status: StudyStatus
    num_trials: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
    links: Links


class StudyPublic(StudySummary):
    submission_id: str | None = None
    ray_job_status: str | None = None
    resume_count: int = 0
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    objective: dict[str, Any] = Field(description="metric, mode (the primary objective) and `also` (further ones)")
    trial_counts: TrialCounts
    best_trial: BestTrial | None = None
    registered_model: Any | None = None
    mlflow_experiment_id: str | None = None
    mlflow_parent_run_id: str | None = None
    spec: dict[str, Any]
    confirmation: Confirmation | None = Field(None, description="the confirmation stage (StudySpec `confirm`)")
    pareto_front: list[dict[str, Any]] | None = Field(
        None, description="multi-objective study: its Pareto-optimal complete trials ({number, values, params})")


class StudiesPublic(BaseModel):
    data: list[StudySummary]
    count: int = Field(description="number of studies matching the filter (all pages)")
    limit: int
    offset: int


class TrialPublic(BaseModel):
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    tune_trial_id: str | None = None
    mlflow_run_id: str | None = None
    epochs_done: int | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    last_value: float | None = None
    flip_frac: float | None = Field(None, description="last epoch's fraction of binary weights whose sign flipped")
    flip_frac_init: float | None = Field(None, description="fraction of binary weights flipped since initialisation")
    bimodality: float | None = Field(None, description="last epoch's bimodality coefficient of the first binary conv")
    checkpoint_uri: str | None = None
    stop_reason: str | None = None
    error: str | None = Field(None, description="why an errored trial failed (its last exception, one line)")
    datetime_start: datetime | None = None
    datetime_complete: datetime | None = None
    duration_s: float | None = None
    values: list[float] | None = Field(None, description="multi-objective study: every objective's value "
                                                         "(`value` is the primary one)")


class TrialsPublic(BaseModel):
    data: list[TrialPublic]
    count: int


class ComponentHealth(BaseModel):
    ok: bool
    detail: str
    url: str | None = None


class HealthPublic(BaseModel):
    status: str = Field(description="ok | degraded")
    components: dict[str, ComponentHealth]


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: list[ErrorItem]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in {
        400: "malformed request (e.g. a Content-Length that is not a number)",
        404: "unknown study id",
        409: "state conflict / idempotency conflict",
        415: "the request body is not JSON",
        422: "validation error, or a limit (trials per study, data directories); loc names the field",
        503: "Ray, MLflow or the store is unavailable",
    }.items()
}
