"""``GET /studies/{id}/report``: the study report (``service.core.report``) as JSON, or with
``?format=html`` as one self-contained HTML page (plots, tables, links). Reads what the other study
routes read -- the store, the Optuna study, MLflow/Ray links -- and nothing else; optuna and plotly are
imported when a report is asked for, never at startup."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, JSONResponse

from service.api.deps import StudyServiceDep
from service.api.routes.studies import study_public, trial_public
from service.api.schemas import ERROR_RESPONSES
from service.api.study_service import StudyService

router = APIRouter(prefix="/studies", tags=["studies"], responses=ERROR_RESPONSES)


def _warm_start(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The search space's warm-start points (the paper's point first), from the spec as stored."""
    import search_spaces

    space = spec.get("search_space")
    try:
        loaded = search_spaces.load_preset(space) if isinstance(space, str) else search_spaces.load(space or {})
        return list(loaded.warm_start_points)
    except Exception:  # noqa: BLE001 - a preset renamed since: a report without the comparison
        return []


def _optuna_study(service: StudyService, study_id: str) -> Any:
    import optuna

    try:
        return optuna.load_study(study_name=study_id, storage=service.trials.storage)
    except Exception:  # noqa: BLE001 - no Optuna study yet (PENDING), storage down: no plots
        return None


@router.get(
    "/{study_id}/report",
    summary="The study report: spec, plots, trials, best trial vs the paper's warm-start point, links",
    responses={200: {"content": {"application/json": {}, "text/html": {}},
                     "description": "JSON data, or with format=html a self-contained HTML page"}},
)
def get_report(study_id: str, service: StudyServiceDep,
               format: Literal["json", "html"] = Query("json", description="json (data) or html (the page)")):
    from service.core.report import build_report, render_html, report_json

    row = service.get(study_id)
    view = service.optuna_view(row.id)
    public = study_public(service, row, view).model_dump(mode="json")
    trials = [trial_public(t).model_dump(mode="json") for t in view.trials]
    ostudy = _optuna_study(service, row.id) if view.exists else None
    report = build_report(public, trials, ostudy, warm_start=_warm_start(row.spec or {}),
                          confirmation=public.get("confirmation"), with_plots=format == "html")
    if format == "html":
        return HTMLResponse(render_html(report))
    return JSONResponse(report_json(report))
