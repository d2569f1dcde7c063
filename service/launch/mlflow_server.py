"""The MLflow tracking server of the embedded stack: ``mlflow server`` on 127.0.0.1 with a SQLite
backend (``{home}/mlflow.db``; with ``--db``, the ``<prefix>_mlflow`` database on that PostgreSQL
server) and artifacts under ``{home}/mlartifacts``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from service.launch.processes import executable, spawn
from service.launch.stack_record import Stack


def spawn_mlflow(stack: Stack, env: dict[str, str]) -> subprocess.Popen:
    """Start the MLflow server of ``stack`` (not waiting for it: its health URL is
    :func:`mlflow_health_url`); recorded as ``stack.procs["mlflow"]``."""
    home = Path(stack.home)
    (home / "mlartifacts").mkdir(exist_ok=True)
    cmd = [
        executable("mlflow"), "server",
        "--backend-store-uri", stack.mlflow_backend_uri,
        "--artifacts-destination", str(home / "mlartifacts"),
        "--host", "127.0.0.1",
        "--port", str(stack.mlflow_port),
        "--workers", "1",
    ]
    proc, popen = spawn("mlflow", cmd, home / "logs" / "mlflow.log", env, cwd=home)
    stack.procs["mlflow"] = proc
    stack.save()
    return popen


def mlflow_health_url(stack: Stack) -> str:
    return f"{stack.mlflow_uri}/health"
