"""Settings: one pydantic-settings class, environment prefix ``BONN_SWEEP_``.

Every storage location derives from ``home`` (``BONN_SWEEP_HOME``, default ``./.bonn-sweep``) unless
set explicitly, so the embedded default needs no configuration and the compose deployment overrides
the URLs (Postgres, shared volume) through the environment, e.g.::

    BONN_SWEEP_STORE_URL=postgresql+psycopg2://bonn:...@postgres:5432/studies
    BONN_SWEEP_OPTUNA_STORAGE=postgresql+psycopg2://bonn:...@postgres:5432/optuna
    BONN_SWEEP_TUNE_STORAGE=/shared/tune
    BONN_SWEEP_MLFLOW_TRACKING_URI=http://mlflow:5000
    BONN_SWEEP_RAY_DASHBOARD_URL=http://ray-head:8265
    BONN_SWEEP_DRIVER_PYTHON=python
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BONN_SWEEP_", extra="ignore")

    home: Path = Field(Path(".bonn-sweep"), description="state folder of the embedded default")

    # storage (None = derived from home)
    store_url: str | None = Field(None, description="SQLAlchemy URL of the study store")
    optuna_storage: str | None = Field(None, description="SQLAlchemy URL of Optuna's RDB storage")
    tune_storage: str | None = Field(None, description="Ray Tune storage_path (shared by all nodes)")
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_ui_url: str | None = Field(None, description="browser URL of MLflow (default: the tracking URI)")
    mlflow_artifacts_dir: Path | None = None

    # Ray
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    ray_dashboard_ui_url: str | None = Field(None, description="browser URL of the dashboard (default: same)")
    ray_auth_token: SecretStr | None = Field(None, description="Bearer token when Ray runs with RAY_AUTH_MODE=token")
    driver_python: str = Field(sys.executable, description="python on the cluster that runs `-m service.driver`")
    job_stop_wait_s: int = Field(60, description="RAY_JOB_STOP_WAIT_TIME_S: grace time after SIGINT")
    driver_num_cpus: float = Field(0, ge=0, description="CPUs reserved for the driver process itself")

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str | None = Field(None, description="URL clients use for the API (default: http://host:port)")
    reconcile_interval_s: float = Field(5.0, gt=0, description="period of the background status reconcile")
    http_timeout_s: float = Field(10.0, gt=0, description="timeout of calls to Ray's and MLflow's HTTP APIs")

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        home = self.home.expanduser().absolute()
        self.home = home
        if self.store_url is None:
            self.store_url = f"sqlite:///{home}/studies.db"
        if self.optuna_storage is None:
            self.optuna_storage = f"sqlite:///{home}/optuna.db"
        if self.tune_storage is None:
            self.tune_storage = str(home / "tune")
        if self.mlflow_artifacts_dir is None:
            self.mlflow_artifacts_dir = home / "mlartifacts"
        if self.api_url is None:
            self.api_url = f"http://{self.api_host}:{self.api_port}"
        return self

    @property
    def mlflow_ui(self) -> str:
        return (self.mlflow_ui_url or self.mlflow_tracking_uri).rstrip("/")

    @property
    def ray_ui(self) -> str:
        return (self.ray_dashboard_ui_url or self.ray_dashboard_url).rstrip("/")

    def ensure_dirs(self) -> None:
        """Create the local folders the SQLite URLs and paths point at (no-op for remote stores)."""
        self.home.mkdir(parents=True, exist_ok=True)
        for url in (self.store_url, self.optuna_storage):
            if url and url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if self.tune_storage and "://" not in self.tune_storage:
            Path(self.tune_storage).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
