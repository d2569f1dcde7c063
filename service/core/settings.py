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

Security and limits (README "Security"): every mutating request needs ``Authorization: Bearer <key>``;
keys live hashed (sha256) in the study store's ``api_keys`` table (``bonn-sweep keys create|list|revoke``)
or come from ``BONN_SWEEP_API_KEYS`` / ``BONN_SWEEP_API_KEYS_FILE`` (a Docker secret). Reads are open
unless ``BONN_SWEEP_API_AUTH_READS=true``. StudySpec paths (``data_root``) must lie in ``data_dirs``.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BONN_SWEEP_", extra="ignore", hide_input_in_errors=True)

    home: Path = Field(Path(".bonn-sweep"), description="state folder of the embedded default")

    # storage (None = derived from home)
    store_url: str | None = Field(None, description="SQLAlchemy URL of the study store")
    optuna_storage: str | None = Field(None, description="SQLAlchemy URL of Optuna's RDB storage")
    tune_storage: str | None = Field(None, description="Ray Tune storage_path (shared by all nodes)")
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_ui_url: str | None = Field(None, description="browser URL of MLflow (default: the tracking URI)")
    mlflow_artifacts_dir: Path | None = None
    db_url: str | None = Field(
        None,
        description="one PostgreSQL server for the study store, Optuna and MLflow "
                    "(postgresql://user[:password]@host[:port][/prefix]; databases <prefix>_studies, "
                    "<prefix>_optuna, <prefix>_mlflow; service/core/db.py); store_url / optuna_storage "
                    "set explicitly win",
    )
    mlflow_backend_uri: str | None = Field(None, description="backend store of the embedded MLflow server")

    # Ray
    ray_dashboard_url: str = "http://127.0.0.1:8265"
    ray_dashboard_ui_url: str | None = Field(None, description="browser URL of the dashboard (default: same)")
    ray_auth_token: SecretStr | None = Field(None, description="Bearer token when Ray runs with RAY_AUTH_MODE=token")
    driver_python: str = Field(sys.executable, description="python on the cluster that runs `-m service.sweep.driver`")
    job_stop_wait_s: int = Field(60, description="RAY_JOB_STOP_WAIT_TIME_S: grace time after SIGINT")
    driver_num_cpus: float = Field(0, ge=0, description="CPUs reserved for the driver process itself")
    optuna_dashboard_url: str | None = Field(
        None, description="browser URL of optuna-dashboard on the Optuna storage (linked from each study)")
    mps: bool = Field(False, description="GPU nodes run an NVIDIA MPS daemon of their own, so trials sharing a "
                                         "GPU run concurrently (`bonn-sweep up --mps`, the compose GPU worker; "
                                         "service/launch/gpu.py)")
    mps_dir: Path | None = Field(None, description="where a compose GPU node keeps its MPS pipe and log "
                                                   "directories (default /tmp/bonn-sweep-node)")

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str | None = Field(None, description="URL clients use for the API (default: http://host:port)")
    reconcile_interval_s: float = Field(5.0, gt=0, description="period of the background status reconcile")
    http_timeout_s: float = Field(10.0, gt=0, description="timeout of calls to Ray's and MLflow's HTTP APIs")

    # API security (service/core/auth.py, service/api/security.py)
    api_keys: SecretStr | None = Field(
        None,
        description="extra keys the API accepts besides the store's, comma-separated; each a key or "
                    "`sha256:<64 hex>` (its hash)",
    )
    api_keys_file: Path | None = Field(
        None, description="a file of such entries, one per line (e.g. a Docker secret /run/secrets/...)"
    )
    api_auth_reads: bool = Field(
        False,
        description="require a key for GET requests too (writes always need one; /healthz and the docs stay open)",
    )
    api_key_cache_s: float = Field(5.0, ge=0, description="how long the API caches the store's key table")
    api_rate_limit_per_s: float = Field(
        50.0, ge=0, description="requests per second per key (anonymous reads: per client address); 0 = off"
    )
    api_rate_limit_burst: int = Field(100, ge=1, description="token-bucket size of the rate limit")
    api_rate_limit_shared: bool = Field(
        True,
        description="keep the rate-limit buckets in the study store, so every API process sharing it counts "
                    "together (false: per process)",
    )
    api_reads_own_studies: bool = Field(
        False,
        description="with api_auth_reads: a key lists and reads only the studies it created (404 for others; "
                    "keys from api_keys / api_keys_file see every study)",
    )
    api_max_body_bytes: int = Field(1_048_576, ge=1024, description="largest request body accepted (413 above)")

    # limits
    max_trials_per_study: int = Field(1000, ge=1, description="largest budget.num_trials (also on resume)")
    max_active_studies: int = Field(
        16, ge=1, description="studies PENDING, RUNNING or STOPPING at once; POST/resume beyond it is 429"
    )
    data_dirs: list[Path] | None = Field(
        None,
        description="directories StudySpec paths (data_root) must lie in, symlinks resolved; "
                    "default: the repository's data/ and .data/ and home",
    )

    @field_validator("data_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, v: object) -> object:
        # BONN_SWEEP_DATA_DIRS: a JSON list, or paths separated by os.pathsep (":")
        if isinstance(v, str) and not v.lstrip().startswith("["):
            import os

            return [p for p in v.split(os.pathsep) if p.strip()]
        return v

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        home = self.home.expanduser().absolute()
        self.home = home
        if self.db_url:  # a bad URL is a validation error naming db_url (service/core/db.py says why)
            from service.core.db import derive_urls

            urls = derive_urls(self.db_url)
            self.store_url = self.store_url or urls.store
            self.optuna_storage = self.optuna_storage or urls.optuna
            self.mlflow_backend_uri = self.mlflow_backend_uri or urls.mlflow
        if self.mlflow_backend_uri is None:
            self.mlflow_backend_uri = f"sqlite:///{home}/mlflow.db"
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
        if self.data_dirs is None:
            repo = Path(__file__).resolve().parent.parent
            self.data_dirs = [repo / "data", repo / ".data", home]
        self.data_dirs = [Path(d).expanduser().absolute() for d in self.data_dirs]
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
