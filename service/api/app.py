"""The FastAPI app: ``uvicorn service.api.app:create_app --factory`` (docs at /docs), or
``uvicorn service.api.app:app`` (the same, built from the environment on first access).

The API never calls ``ray.init()``: it talks to the Ray Jobs REST API over HTTP
(:mod:`service.core.jobs`), to MLflow through its tracking server, and reads Optuna's RDB storage.
API keys, the rate limit and the body-size limit sit in front of every route
(:mod:`service.api.security`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.api.backends import MlflowGateway, OptunaReader
from service.api.errors import install_error_handlers
from service.api.routes import health, report, studies
from service.api.security import KeyProvider, SecurityMiddleware, patch_openapi
from service.api.study_service import ReconcileLoop, StudyService
from service.core.jobs import RayJobsClient
from service.core.settings import Settings, get_settings
from service.core.store import StudyStore

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
        try:
            if not len(keys.ring()):
                log.warning("no API keys: every write request will be refused (401/403); create one with "
                            "`bonn-sweep keys create` or set BONN_SWEEP_API_KEYS")
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable keys file: refuse writes, say why
            log.error("API keys could not be loaded: %s", exc)
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
    keys = KeyProvider(settings, lambda: getattr(app.state, "store", None))
    app.state.keys = keys
    install_error_handlers(app)
    app.include_router(studies.router)
    app.include_router(report.router)
    app.include_router(health.router)
    app.add_middleware(SecurityMiddleware, settings=settings, keys=keys)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = patch_openapi(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def __getattr__(name: str) -> FastAPI:
    """``service.api.app:app`` (the compose file's uvicorn target): built from the environment once."""
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
