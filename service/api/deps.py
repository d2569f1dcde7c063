"""``Annotated`` dependencies. Unit tests swap ``get_jobs`` / ``get_tracking`` / ``get_trials`` for
stubs with ``app.dependency_overrides``; the components themselves live on ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.backends import MlflowGateway, OptunaReader
from service.api.study_service import StudyService
from service.core.jobs import RayJobsClient
from service.core.settings import Settings
from service.core.store import StudyStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> StudyStore:
    return request.app.state.store


def get_jobs(request: Request) -> RayJobsClient:
    return request.app.state.jobs


def get_tracking(request: Request) -> MlflowGateway:
    return request.app.state.tracking


def get_trials(request: Request) -> OptunaReader:
    return request.app.state.trials


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[StudyStore, Depends(get_store)]
JobsDep = Annotated[RayJobsClient, Depends(get_jobs)]
TrackingDep = Annotated[MlflowGateway, Depends(get_tracking)]
TrialsDep = Annotated[OptunaReader, Depends(get_trials)]


def get_study_service(
    request: Request, settings: SettingsDep, store: StoreDep, jobs: JobsDep, tracking: TrackingDep, trials: TrialsDep
) -> StudyService:
    service = StudyService(settings, store, jobs, tracking, trials)
    service.for_key(getattr(request.state, "api_key_id", None), getattr(request.state, "api_key_static", False))
    return service


StudyServiceDep = Annotated[StudyService, Depends(get_study_service)]
