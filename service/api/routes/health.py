"""/healthz: Ray (Jobs API), MLflow (/health), the study store and Optuna's storage."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import JobsDep, SettingsDep, StoreDep, TrackingDep, TrialsDep
from service.api.schemas import ComponentHealth, HealthPublic

router = APIRouter(tags=["health"])


def _check(fn, url: str | None = None) -> ComponentHealth:  # noqa: ANN001
    try:
        detail = fn()
        return ComponentHealth(ok=True, detail=str(detail), url=url)
    except Exception as exc:  # noqa: BLE001 - every failure is a "down" with its message
        return ComponentHealth(ok=False, detail=f"{exc.__class__.__name__}: {exc}"[:500], url=url)


@router.get(
    "/healthz",
    response_model=HealthPublic,
    responses={503: {"model": HealthPublic, "description": "a component is down"}},
    summary="200 when Ray, MLflow and the stores answer; 503 with details otherwise",
)
def healthz(
    settings: SettingsDep, store: StoreDep, jobs: JobsDep, tracking: TrackingDep, trials: TrialsDep
) -> JSONResponse:
    def ray() -> str:
        v = jobs.version()
        return f"ray {v.get('ray_version')} (session {v.get('session_name')})"

    def store_ok() -> str:
        store.ping()
        return "ok"

    components = {
        "ray": _check(ray, settings.ray_dashboard_url),
        "mlflow": _check(tracking.ping, settings.mlflow_tracking_uri),
        "store": _check(store_ok),
        "optuna": _check(trials.ping),
    }
    ok = all(c.ok for c in components.values())
    body = HealthPublic(status="ok" if ok else "degraded", components=components)
    return JSONResponse(status_code=200 if ok else 503, content=body.model_dump(mode="json"))
