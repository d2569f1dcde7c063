"""optuna-dashboard of the embedded stack: ``optuna-dashboard <optuna storage> --host 127.0.0.1`` on a
port of its own, against the study storage the API and the drivers use (``BONN_SWEEP_OPTUNA_STORAGE``,
default ``sqlite:///{home}/optuna.db``). Every study of the stack is an Optuna study there (name = the
study id), so the dashboard lists them all and compares several side by side. Recorded in stack.json
as ``procs["optuna_dashboard"]`` and stopped by pid with the rest of the stack.

The storage's tables are created first (optuna-dashboard opens a storage with ``skip_table_creation``).
The stack starts without it (a warning, not a failure) when ``optuna-dashboard`` is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from service.launch.processes import executable, spawn
from service.launch.stack_record import Stack

NAME = "optuna_dashboard"


def dashboard_storage(home: str | Path, env: dict[str, str]) -> str:
    """The Optuna storage URL of the stack (the one the API hands the drivers)."""
    from service.core.settings import Settings

    url = env.get("BONN_SWEEP_OPTUNA_STORAGE") or Settings(home=Path(home)).optuna_storage or ""
    Settings(home=Path(home), optuna_storage=url).ensure_dirs()
    import optuna  # (lazily: only `up` pays for it) optuna-dashboard opens a storage without creating its tables

    optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {})
    return url


def available() -> bool:
    exe = executable("optuna-dashboard")
    return Path(exe).exists() or shutil.which(exe) is not None


def spawn_optuna_dashboard(stack: Stack, env: dict[str, str]) -> subprocess.Popen:
    """Start optuna-dashboard for ``stack`` (not waiting for it: :func:`optuna_dashboard_health_url`)."""
    home = Path(stack.home)
    cmd = [
        executable("optuna-dashboard"), dashboard_storage(home, env),
        "--host", "127.0.0.1", "--port", str(stack.optuna_dashboard_port), "--server", "wsgiref", "--quiet",
    ]
    proc, popen = spawn(NAME, cmd, home / "logs" / "optuna-dashboard.log", env, cwd=home)
    stack.procs[NAME] = proc
    stack.save()
    return popen


def optuna_dashboard_health_url(stack: Stack) -> str:
    return f"{stack.optuna_dashboard_url}/api/studies"
