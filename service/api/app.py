"""The FastAPI app: ``uvicorn service.api.app:create_app --factory`` (docs at /docs).

The API never calls ``ray.init()``: it talks to the Ray Jobs REST API over HTTP
(:mod:`service.jobs`), to MLflow through its tracking server, and reads Optuna's RDB storage.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.backends import MlflowGateway, OptunaReader
from service.api.errors import install_error_handlers
from service.api.routes import health, studies
from service.api.study_service import ReconcileLoop, StudyService
from service.jobs import RayJobsClient
from service.settings import Settings, get_settings
from service.store import StudyStore

log = logging.getLogger("service.api")


def create_app(settings: Settings | None = None, *, reconcile: bool = True, warm_up: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        store = StudyStore(settings.store_url or "")
        store.create_all()
        jobs = RayJobsClient(
            settings.ray_dashboard_url,
            token=settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None,
            timeout_s=settings.http_timeout_s,
        )
        tracking = MlflowGateway(settings.mlflow_tracking_uri, settings.mlflow_ui_url)
        trials = OptunaReader(settings.optuna_storage or "")
        try:  # create Optuna's tables once, here, before any driver races to do it
            trials.ping()
        except Exception as exc:  # noqa: BLE001 - health reports it
            log.warning("optuna storage not ready: %s", exc)
        if warm_up:  # import mlflow and the validation stack now, not during the first POST (~3 s)
            _ = tracking.client
            import trainables.config  # noqa: F401

            import search_spaces  # noqa: F401
        app.state.settings, app.state.store, app.state.jobs = settings, store, jobs
        app.state.tracking, app.state.trials = tracking, trials
        loop = None
        if reconcile:
            loop = ReconcileLoop(StudyService(settings, store, jobs, tracking, trials), settings.reconcile_interval_s)
            loop.start()
        try:
            yield
        finally:
            if loop is not None:
                loop.stop()
            jobs.close()
            store.close()

    app = FastAPI(
        title="bonn-sweep",
        summary="Hyperparameter sweeps for 1-bit CNNs (BONN) on Ray Tune + Optuna, tracked in MLflow",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(studies.router)
    app.include_router(health.router)
    return app
