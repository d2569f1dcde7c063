"""The API of the embedded stack: ``uvicorn service.api.app:create_app`` on 127.0.0.1, and the local
user's API key it accepts.

The API needs a key for every write: :func:`ensure_stack_key` makes sure ``{home}/api-key`` (mode
0600) holds a key the store knows (service/core/auth.py); the CLI and
:meth:`~service.launch.stack_record.Stack.env` pick it up from there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from service.launch.processes import Proc, StackError, http_ok, spawn, stop_proc, wait_healthy
from service.launch.stack_record import REPO_ROOT, Stack, server_env


def ensure_stack_key(home: Path, extra_env: dict[str, str] | None = None, db_url: str | None = None) -> str:
    """The local user's key for the stack in ``home`` (created if missing), in the store the API uses."""
    from service.core.auth import ensure_local_key
    from service.core.settings import Settings

    url = (extra_env or {}).get("BONN_SWEEP_STORE_URL") or Settings(home=home, db_url=db_url).store_url or ""
    Settings(home=home, store_url=url).ensure_dirs()
    return ensure_local_key(home, url)


def start_api(stack: Stack, *, base_env: dict[str, str] | None = None, timeout_s: float = 60.0) -> Proc:
    """(Re)start the API of ``stack`` under uvicorn on ``stack.api_port``; records it in stack.json.
    A running API of this stack is stopped first (e.g. to test the reconcile after an API restart)."""
    if stack.api_port is None:
        raise StackError("this stack was started without an API port")
    old = stack.procs.get("api")
    if old is not None and old.alive():
        stop_proc(old, grace_s=15.0)
    env = server_env(base=base_env)
    env.update(stack.env())
    env.pop("BONN_SWEEP_API_KEY", None)  # a client's key: the server has the hashes
    cmd = [
        sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(stack.api_port), "--log-level", "info",
    ]
    proc, popen = spawn("api", cmd, Path(stack.home) / "logs" / "api.log", env, cwd=REPO_ROOT)
    stack.procs["api"] = proc
    stack.save()
    stack.timings["api_s"] = round(wait_healthy("API", http_ok(f"{stack.api_url}/healthz"), proc, popen, timeout_s), 2)
    stack.save()
    return proc
