"""/studies: thin routes over :class:`service.api.study_service.StudyService`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response, status

from service.api.backends import TRIAL_ATTRS, StudyView, TrialView
from service.api.deps import StudyServiceDep
from service.api.errors import ApiError
from service.api.schemas import (
    ERROR_RESPONSES,
    BestTrial,
    Confirmation,
    Links,
    ResumeRequest,
    StudiesPublic,
    StudyCreate,
    StudyPublic,
    StudySummary,
    TrialCounts,
    TrialPublic,
    TrialsPublic,
)
from service.api.study_service import StudyService
from service.core.store import Study, StudyStatus

MAX_OFFSET = 2**31 - 1  # far beyond any page; bigger ones overflowed SQLite's INTEGER (found by schemathesis)

router = APIRouter(prefix="/studies", tags=["studies"], responses=ERROR_RESPONSES)


def require_json(request: Request) -> None:
    """415 for a body that is not JSON (FastAPI would otherwise report a confusing type error)."""
    ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ct and ct != "application/json" and not ct.endswith("+json"):
        raise ApiError(
            415, f"Content-Type must be application/json (got {ct!r})", ["header", "Content-Type"], "unsupported_media_type"
        )


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="replaying the same key with the same body returns the same study; a different body is 409",
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StudyPublic,
    dependencies=[Depends(require_json)],
    summary="Create a study and submit it as a Ray job",
    responses={200: {"model": StudyPublic, "description": "an idempotent replay: the study the first request "
                                                          "with this Idempotency-Key created (nothing new)"}},
)
def create_study(
    spec: StudyCreate, service: StudyServiceDep, response: Response, idempotency_key: IdempotencyKey = None
) -> StudyPublic:
    row, created = service.create(spec, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/studies/{row.id}"
    return study_public(service, service.reconcile(row) if not created else row)


@router.get("", response_model=StudiesPublic, summary="List studies (newest first)")
def list_studies(
    service: StudyServiceDep,
    status_: Annotated[StudyStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> StudiesPublic:
    rows, total = service.list(status=status_, limit=limit, offset=offset)
    return StudiesPublic(data=[study_summary(service, r) for r in rows], count=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyPublic, summary="A study: status, trial counts, best trial")
def get_study(study_id: str, service: StudyServiceDep) -> StudyPublic:
    return study_public(service, service.get(study_id))


@router.get("/{study_id}/trials", response_model=TrialsPublic, summary="The study's trials (from Optuna)")
def get_trials(
    study_id: str,
    service: StudyServiceDep,
    state: Annotated[str | None, Query(description="COMPLETE | PRUNED | FAIL | RUNNING | WAITING")] = None,
) -> TrialsPublic:
    service.get(study_id, reconcile=False)  # 404 for an unknown id
    view = service.optuna_view(study_id)
    trials = [trial_public(t) for t in view.trials if state is None or t.state == state.upper()]
    return TrialsPublic(data=trials, count=len(trials))


@router.post("/{study_id}/cancel", response_model=StudyPublic, summary="Stop the study's job (Tune saves its state)")
def cancel_study(study_id: str, service: StudyServiceDep) -> StudyPublic:
    return study_public(service, service.cancel(study_id))


@router.post(
    "/{study_id}/resume",
    response_model=StudyPublic,
    summary="Resubmit a CANCELLED, FAILED or INTERRUPTED study with the same Tune state, Optuna study and MLflow run",
)
def resume_study(
    study_id: str, service: StudyServiceDep, body: Annotated[ResumeRequest | None, Body()] = None
) -> StudyPublic:
    return study_public(service, service.resume(study_id, body.num_trials if body else None))


# -- presentation ------------------------------------------------------------------------------------


def _links(service: StudyService, row: Study) -> Links:
    return Links(
        mlflow_run=service.tracking.run_url(row.mlflow_experiment_id, row.mlflow_parent_run_id),
        mlflow_experiment=service.tracking.experiment_url(row.mlflow_experiment_id),
        ray_job=f"{service.settings.ray_ui}/#/jobs/{row.submission_id}" if row.submission_id else None,
        optuna_dashboard=_dashboard_link(service, None),
    )


def _dashboard_link(service: StudyService, optuna_study_id: int | None) -> str | None:
    """optuna-dashboard's page of the study (its numeric storage id), else its list of studies."""
    base = (service.settings.optuna_dashboard_url or "").rstrip("/")
    if not base:
        return None
    return f"{base}/dashboard/studies/{optuna_study_id}" if optuna_study_id is not None else f"{base}/dashboard"


def study_summary(service: StudyService, row: Study) -> StudySummary:
    return StudySummary(
        id=row.id,
        name=row.name,
        status=StudyStatus(row.status),
        num_trials=row.num_trials,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        error=row.error,
        links=_links(service, row),
    )


def best_trial(view: StudyView, mode: str, selection: str = "best") -> BestTrial | None:
    t = view.best(mode)
    if t is None:
        return None
    a = t.user_attrs
    epoch = a.get("best_epoch", a.get("epochs_done")) if selection == "best" else a.get("epochs_done", a.get("best_epoch"))
    return BestTrial(
        number=t.number,
        params=t.params,
        value=t.value,
        epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
        mlflow_run_id=a.get("mlflow_run_id"),
        checkpoint_uri=a.get("checkpoint_uri"),
        tune_trial_id=a.get("tune_trial_id"),
    )


def study_public(service: StudyService, row: Study, view: StudyView | None = None) -> StudyPublic:
    """The study as the API shows it; ``view``: its Optuna view when the caller has read it already."""
    spec = row.spec
    objective = {"metric": "val_acc", "mode": "max", "selection": "last", **(spec.get("objective") or {})}
    view = view if view is not None else service.optuna_view(row.id)
    summary = study_summary(service, row)
    summary.links.optuna_dashboard = _dashboard_link(service, getattr(view, "optuna_study_id", None))
    return StudyPublic(
        **summary.model_dump(),
        submission_id=row.submission_id,
        ray_job_status=row.ray_job_status,
        resume_count=row.resume_count,
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        objective=objective,
        trial_counts=TrialCounts(**view.counts()),
        best_trial=best_trial(view, objective["mode"], objective["selection"]),
        registered_model=view.user_attrs.get("registered_model"),
        mlflow_experiment_id=row.mlflow_experiment_id,
        mlflow_parent_run_id=row.mlflow_parent_run_id,
        spec=spec,
        confirmation=confirmation(view),
        pareto_front=_pareto(view, objective),
    )


def confirmation(view: StudyView) -> Confirmation | None:
    """The driver's confirmation summary (Optuna study user attr ``confirmation``), if any."""
    raw = view.user_attrs.get("confirmation")
    if not isinstance(raw, dict):
        return None
    try:
        return Confirmation.model_validate(raw)
    except ValueError:  # pydantic ValidationError: a summary of another version; never a 500
        return None


def _pareto(view: StudyView, objective: dict) -> list[dict] | None:
    """A multi-objective study's Pareto front (objective.also set), else None."""
    also = objective.get("also") or []
    if not also:
        return None
    from service.api.backends import pareto_front

    modes = [objective.get("mode", "max"), *(a.get("mode", "max") for a in also)]
    return [{"number": t.number, "values": t.values, "params": t.params} for t in pareto_front(view.trials, modes)]


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def trial_public(t: TrialView) -> TrialPublic:
    a = {k: t.user_attrs.get(k) for k in TRIAL_ATTRS}
    ep, be = _num(a["epochs_done"]), _num(a["best_epoch"])
    return TrialPublic(
        number=t.number,
        state=t.state,
        value=t.value,
        params=t.params,
        tune_trial_id=a["tune_trial_id"],
        mlflow_run_id=a["mlflow_run_id"],
        epochs_done=int(ep) if ep is not None else None,
        best_value=_num(a["best_value"]),
        best_epoch=int(be) if be is not None else None,
        last_value=_num(a["last_value"]),
        flip_frac=_num(a["flip_frac"]),
        flip_frac_init=_num(a["flip_frac_init"]),
        bimodality=_num(a["bimodality"]),
        checkpoint_uri=a["checkpoint_uri"],
        stop_reason=a["stop_reason"],
        error=a["error"],
        datetime_start=t.datetime_start,
        datetime_complete=t.datetime_complete,
        duration_s=t.duration_s,
        values=t.values,
    )
