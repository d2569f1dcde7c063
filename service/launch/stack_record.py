"""What an embedded stack is: the :class:`Stack` record (home, ports, processes, Ray temp dirs) kept in
``{home}/stack.json``, its addresses and the environment its servers and clients get.

The file is the only state ``bonn-sweep down`` needs: it names every process the stack started, by
pid and start time (service/launch/processes.py), so stopping signals exactly those.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.launch.processes import Proc

STACK_FILE = "stack.json"
#: the source tree (holds ``service/``): put on the servers' PYTHONPATH, so that the API and the
#: driver (a Ray job) import this tree even without ``pip install -e``
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HOME = ".bonn-sweep"

ENV_EMBEDDED = {
    "RAY_AUTH_MODE": "disabled",
    # Ray's node IP = 127.0.0.1, so that GCS, raylet, agents and workers listen on loopback only
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def stack_home(home: str | Path | None = None) -> Path:
    """The stack's state folder: ``home``, else ``BONN_SWEEP_HOME``, else ``./.bonn-sweep`` (absolute)."""
    return Path(home or os.environ.get("BONN_SWEEP_HOME") or DEFAULT_HOME).expanduser().absolute()


def server_env(extra_env: dict[str, str] | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a server of the stack: ``base`` (default: this process's environment with
    :data:`ENV_EMBEDDED` and ``extra_env``), with :data:`REPO_ROOT` first on ``PYTHONPATH``."""
    env = dict(base) if base is not None else {**os.environ, **ENV_EMBEDDED, **(extra_env or {})}
    root = str(REPO_ROOT)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return env


@dataclass
class Stack:
    """A running (or recorded) embedded stack; saved as ``{home}/stack.json``."""

    home: str
    ray_temp_dir: str
    ray_temp_dir_is_tmp: bool
    gcs_port: int
    dashboard_port: int
    mlflow_port: int
    api_port: int | None
    num_cpus: int
    procs: dict[str, Proc] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    worker_temp_dirs: dict[str, str] = field(default_factory=dict)  # extra Ray nodes (start_ray_worker)
    #: ``--db``: one PostgreSQL server for the three stores (service/core/db.py); None: SQLite in home.
    #: It may hold a password: stack.json is then written mode 0600, and only :attr:`db_display` is printed.
    db_url: str | None = None
    optuna_dashboard_port: int | None = None  # service/launch/optuna_dashboard.py (None: not started)
    num_gpus: int = 0  # GPUs the head node offers to trials (``bonn-sweep up --gpus``)
    #: ``--mps``: the pipe and log directories of the stack's MPS daemon (service/launch/gpu.py), whose
    #: process is ``procs["mps"]``; None: no MPS (GPU processes are time-sliced)
    mps_dirs: tuple[str, str] | None = None

    # -- addresses --------------------------------------------------------------------------------
    @property
    def api_url(self) -> str | None:
        return f"http://127.0.0.1:{self.api_port}" if self.api_port else None

    @property
    def db_display(self) -> str:
        """Where the three stores live, password hidden."""
        from service.core.db import redact

        return redact(self.db_url) if self.db_url else f"SQLite under {self.home}"

    @property
    def mlflow_backend_uri(self) -> str:
        from service.core.db import derive_urls

        return derive_urls(self.db_url).mlflow if self.db_url else f"sqlite:///{self.home}/mlflow.db"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def ray_address(self) -> str:
        """GCS address, for ``ray.init(address=...)`` (tests of the driver)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def optuna_dashboard_url(self) -> str | None:
        return f"http://127.0.0.1:{self.optuna_dashboard_port}" if self.optuna_dashboard_port else None

    @property
    def mps(self) -> Any:
        """The stack's :class:`service.launch.gpu.Mps`, or None without ``--mps``."""
        from service.launch.gpu import Mps

        return Mps(*self.mps_dirs) if self.mps_dirs else None

    def gpu_env(self) -> dict[str, str]:
        """What a Ray node of this stack adds to its environment: the MPS client settings, if any."""
        return self.mps.env() if self.mps_dirs else {}

    @property
    def home_path(self) -> Path:
        return Path(self.home)

    @property
    def api_key(self) -> str | None:
        """The local user's API key of this stack (``{home}/api-key``)."""
        from service.core.auth import read_local_key

        return read_local_key(self.home)

    def env(self) -> dict[str, str]:
        """Environment for processes that talk to this stack (API, driver tests, CLI); with
        ``BONN_SWEEP_API_KEY`` for clients."""
        env = {
            **ENV_EMBEDDED,
            "BONN_SWEEP_HOME": self.home,
            "BONN_SWEEP_MLFLOW_TRACKING_URI": self.mlflow_uri,
            "BONN_SWEEP_MLFLOW_ARTIFACTS_DIR": str(Path(self.home) / "mlartifacts"),
            "BONN_SWEEP_RAY_DASHBOARD_URL": self.ray_dashboard_url,
            "BONN_SWEEP_DRIVER_PYTHON": sys.executable,
        }
        if self.db_url:
            env["BONN_SWEEP_DB_URL"] = self.db_url
        if self.optuna_dashboard_port and "optuna_dashboard" in self.procs:
            env["BONN_SWEEP_OPTUNA_DASHBOARD_URL"] = self.optuna_dashboard_url or ""
        if self.api_port:
            env["BONN_SWEEP_API_PORT"] = str(self.api_port)
            env["BONN_SWEEP_API_HOST"] = "127.0.0.1"
            env["BONN_SWEEP_API_URL"] = self.api_url or ""
        key = self.api_key
        if key:
            env["BONN_SWEEP_API_KEY"] = key
        return env

    @property
    def settings(self) -> Any:
        """A :class:`service.core.settings.Settings` pointing at this stack."""
        from service.core.settings import Settings

        return Settings(
            home=Path(self.home),
            mlflow_tracking_uri=self.mlflow_uri,
            ray_dashboard_url=self.ray_dashboard_url,
            api_port=self.api_port or 8000,
            driver_python=sys.executable,
            db_url=self.db_url,
        )

    def alive(self) -> dict[str, bool]:
        return {name: p.alive() for name, p in self.procs.items()}

    # -- persistence ------------------------------------------------------------------------------
    def save(self) -> None:
        path = Path(self.home) / STACK_FILE
        tmp = path.with_suffix(".tmp")
        data = asdict(self)
        tmp.write_text(json.dumps(data, indent=2))
        if self.db_url:  # it may hold the database password
            os.chmod(tmp, 0o600)
        tmp.replace(path)

    @classmethod
    def load(cls, home: str | Path) -> Stack | None:
        path = Path(home).absolute() / STACK_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        procs = {k: Proc(**v) for k, v in data.pop("procs", {}).items()}
        if data.get("mps_dirs"):
            data["mps_dirs"] = tuple(data["mps_dirs"])
        return cls(**data, procs=procs)
