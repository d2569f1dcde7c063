"""The embedded default: a local Ray head, an MLflow server and the API, started and stopped by pid.

``start_stack(home)`` starts the three as child processes, each in its own session/process group
(``start_new_session=True``), on 127.0.0.1 and on ports of its own (free ones, or the usual 8265 /
5000 / 8000 when ``prefer_default_ports`` and they are free), waits until each answers its health
check and writes everything needed to stop them into ``{home}/stack.json``. ``stop_stack(home)``
stops exactly those processes: SIGTERM to each recorded leader, then to its process group, a grace
period, then SIGKILL to whatever is left of those groups and of the recorded processes' descendants
-- never anything else (``ray stop`` would kill every Ray cluster on the machine, colleagues' included).

Every server of the embedded stack listens on 127.0.0.1 only (tests/integration/test_security_e2e.py
reads the listening sockets of every process of the stack from /proc; how Ray is made to, in
service/launch/ray_cluster.py).

Ray runs with ``RAY_AUTH_MODE=disabled``: the embedded stack binds every port to 127.0.0.1, and token
auth would otherwise write ``~/.ray/auth_token``, which then turns token auth on for every later
cluster and client of this user. The compose deployment documents how to run with a token
(``BONN_SWEEP_RAY_AUTH_TOKEN``).

``start_stack(home, db_url="postgresql://...")`` (``bonn-sweep up --db``) keeps the study store,
Optuna and MLflow on that PostgreSQL server (three databases, created when missing: service/core/db.py);
a bad URL or an unreachable server is a :class:`StackError` naming it (password hidden) before anything
starts.

The pieces: service/launch/processes.py (spawn, health waits, stopping by pid), ports.py,
stack_record.py (``stack.json``), ray_cluster.py, mlflow_server.py, api_server.py, watchdog.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from service.core.db import DatabaseUnavailable, DatabaseUrlError, derive_urls, ensure_databases, redact
from service.launch.api_server import ensure_stack_key, start_api
from service.launch.gpu import MpsError, prepare_mps, visible_gpus, wait_mps_ready
from service.launch.mlflow_server import mlflow_health_url, spawn_mlflow
from service.launch.optuna_dashboard import available as optuna_dashboard_available
from service.launch.optuna_dashboard import optuna_dashboard_health_url, spawn_optuna_dashboard
from service.launch.ports import PortPicker
from service.launch.processes import StackError, http_ok, spawn, stop_proc, wait_healthy
from service.launch.ray_cluster import WORKER_NODE_PREFIX, ray_jobs_ready, ray_temp_dir_for, spawn_ray_head
from service.launch.stack_record import STACK_FILE, Stack, server_env


def start_stack(
    home: str | Path,
    *,
    num_cpus: int | None = None,
    with_api: bool = True,
    prefer_default_ports: bool = False,
    object_store_mb: int = 300,
    timeout_s: float = 120.0,
    log: Callable[[str], None] | None = None,
    extra_env: dict[str, str] | None = None,
    db_url: str | None = None,
    with_optuna_dashboard: bool = True,
    num_gpus: int | None = None,
    mps: bool = False,
) -> Stack:
    """Start Ray head + MLflow server (+ optuna-dashboard, + API) for ``home``; returns the running :class:`Stack`.

    ``num_gpus``: GPUs the head offers to trials (None: every GPU visible here, 0 without NVIDIA's
    driver). ``mps``: run an MPS daemon of the stack's own, so trials sharing a GPU run their kernels
    concurrently instead of time-sliced (service/launch/gpu.py); a :class:`StackError` says why when it
    cannot start, before anything else starts.

    If ``{home}/stack.json`` describes a stack whose processes are all alive, that stack is returned
    unchanged; a stale file is cleaned up (its leftovers stopped) first.
    """
    say = log or (lambda _m: None)
    home = Path(home).expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)

    if db_url:
        check_db(db_url, say)
    existing = Stack.load(home)
    if existing is not None and db_url and existing.db_url != db_url and all(existing.alive().values()):
        raise StackError(f"the stack in {home} is running on {existing.db_display}; `bonn-sweep down` it first "
                         f"to use {redact(db_url)}")
    if existing is not None and mps and not existing.mps_dirs and all(existing.alive().values()):
        raise StackError(f"the stack in {home} is running without MPS; `bonn-sweep down` it first to use --mps")
    gpus = visible_gpus() if num_gpus is None else num_gpus
    if gpus < 0:
        raise StackError(f"--gpus must be 0 or more (got {gpus})")
    if mps and gpus == 0:
        raise StackError("--mps: the stack offers no GPU (--gpus 0, or none visible here); MPS shares a GPU "
                         "between trials and needs one")
    if existing is not None:
        alive = existing.alive()
        if alive and all(alive.values()) and (existing.api_port is not None or not with_api):
            say(f"stack already running (home {home})")
            if with_api:
                ensure_stack_key(home, extra_env, existing.db_url)
            return existing
        say("found a stale stack.json: stopping its leftovers")
        stop_stack(home)

    ports = PortPicker(prefer_defaults=prefer_default_ports)
    dashboard_port = ports.pick(8265)
    mlflow_port = ports.pick(5000)
    api_port = ports.pick(8000) if with_api else None
    gcs_port = ports.pick()
    with_dashboard = with_optuna_dashboard and optuna_dashboard_available()
    optuna_dashboard_port = ports.pick(8080) if with_dashboard else None
    temp_dir, temp_is_tmp = ray_temp_dir_for(home)
    temp_dir.mkdir(parents=True, exist_ok=True)

    stack = Stack(
        home=str(home),
        ray_temp_dir=str(temp_dir),
        ray_temp_dir_is_tmp=temp_is_tmp,
        gcs_port=gcs_port,
        dashboard_port=dashboard_port,
        mlflow_port=mlflow_port,
        api_port=api_port,
        num_cpus=num_cpus or os.cpu_count() or 1,
        db_url=db_url or None,
        optuna_dashboard_port=optuna_dashboard_port,
        num_gpus=gpus,
    )
    # The driver runs as a Ray job: server_env makes this source tree importable there even without `pip install -e`.
    base_env = server_env(extra_env)
    popens: dict[str, subprocess.Popen] = {}
    t_start = time.monotonic()
    try:
        # (0) the MPS daemon first: Ray's workers (the trials) must find it when they start CUDA
        if mps:
            start_mps(stack, base_env, timeout_s=min(timeout_s, 30.0))
            say(f"MPS daemon up in {stack.timings['mps_s']:.1f}s (pipe dir {stack.mps_dirs[0]})")
        # (a) Ray head and (b) MLflow server start side by side
        popens["ray"] = spawn_ray_head(stack, ports, base_env, object_store_mb=object_store_mb)
        say(f"starting Ray head (dashboard :{dashboard_port}, GCS :{gcs_port}, temp dir {temp_dir})")
        popens["mlflow"] = spawn_mlflow(stack, base_env)
        say(f"starting MLflow server (:{mlflow_port}, backend {redact(stack.mlflow_backend_uri)})")

        stack.timings["ray_s"] = round(
            wait_healthy("Ray head", ray_jobs_ready(stack.ray_dashboard_url), stack.procs["ray"], popens["ray"], timeout_s), 2
        )
        say(f"Ray head up in {stack.timings['ray_s']:.1f}s")
        stack.timings["mlflow_s"] = round(
            wait_healthy("MLflow server", http_ok(mlflow_health_url(stack)), stack.procs["mlflow"], popens["mlflow"], timeout_s)
            + stack.timings["ray_s"], 2
        )
        say(f"MLflow up after {stack.timings['mlflow_s']:.1f}s")

        # (b') optuna-dashboard on the study storage (before the API: the API links to it)
        if with_dashboard:
            popens["optuna_dashboard"] = spawn_optuna_dashboard(stack, base_env)
            stack.timings["optuna_dashboard_s"] = round(wait_healthy(
                "optuna-dashboard", http_ok(optuna_dashboard_health_url(stack)), stack.procs["optuna_dashboard"],
                popens["optuna_dashboard"], timeout_s), 2)
            say(f"optuna-dashboard up in {stack.timings['optuna_dashboard_s']:.1f}s (:{optuna_dashboard_port})")
        elif with_optuna_dashboard:
            say("optuna-dashboard is not installed: starting without it (pip install optuna-dashboard)")

        # (c) API, with a key for the local user
        if with_api:
            ensure_stack_key(home, extra_env, db_url)
            say(f"starting API (:{api_port})")
            start_api(stack, base_env=base_env)
            say(f"API up in {stack.timings['api_s']:.1f}s")
    except BaseException:
        stop_stack(home, quiet=True)
        raise
    stack.timings["total_s"] = round(time.monotonic() - t_start, 2)
    stack.save()
    return stack


def start_mps(stack: Stack, env: dict[str, str], timeout_s: float = 30.0) -> None:
    """The stack's MPS daemon (``nvidia-cuda-mps-control -f``, a child in its own session recorded as
    ``procs["mps"]``), answering before this returns; :class:`StackError` in one line if it cannot."""
    home = Path(stack.home)
    try:
        mps, cmd = prepare_mps(home)
    except MpsError as exc:
        raise StackError(str(exc)) from None
    stack.mps_dirs = (mps.pipe_dir, mps.log_dir)
    proc, popen = spawn("mps", cmd, home / "logs" / "mps.log", {**env, **mps.env()}, cwd=home)
    stack.procs["mps"] = proc
    stack.save()
    try:
        stack.timings["mps_s"] = round(wait_mps_ready(mps, popen, timeout_s), 2)
    except MpsError as exc:
        raise StackError(str(exc)) from None


def check_db(db_url: str, say: Callable[[str], None] = lambda _m: None, timeout_s: float = 5.0) -> None:
    """Check ``--db`` and create its three databases when missing: :class:`StackError` with a one-line
    reason (bad URL, server unreachable, no right to create a database), the password hidden."""
    try:
        urls = derive_urls(db_url)
        created = ensure_databases(urls, timeout_s=timeout_s)
    except (DatabaseUrlError, DatabaseUnavailable) as exc:
        raise StackError(str(exc)) from None
    if created:
        say(f"created databases {', '.join(created)} on {redact(db_url)}")


def stop_stack(
    home: str | Path | Stack,
    *,
    grace_s: float = 20.0,
    remove_temp: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Stop what :func:`start_stack` recorded for ``home``; returns the names of processes stopped.

    Order: API first (no new submissions), then Ray (its jobs get SIGTERM through the head), then the
    MPS daemon (told to ``quit`` once its clients are gone), then MLflow (last, so a stopping driver can
    still log). Each leader gets SIGTERM, then the rest of
    its group, then SIGKILL after ``grace_s``. Only the recorded process groups and the
    recorded processes' descendants are signalled, and only if the pid still has the recorded start
    time (a stale stack.json after a reboot never kills a stranger).
    """
    say = log or (lambda _m: None)
    stack = home if isinstance(home, Stack) else Stack.load(home)
    if stack is None:
        return []
    stopped = []
    workers = sorted(n for n in stack.procs if n.startswith(WORKER_NODE_PREFIX))
    for name in ("api", *workers, "ray", "mps", "optuna_dashboard", "mlflow"):
        proc = stack.procs.get(name)
        if proc is None or not proc.alive():
            continue
        if name == "mps" and stack.mps is not None:
            stack.mps.quit()  # after Ray: its clients are gone; then stop_proc waits for the exit
        stop_proc(proc, grace_s=grace_s, say=say)
        stopped.append(name)
    with contextlib.suppress(FileNotFoundError):
        (Path(stack.home) / STACK_FILE).unlink()
    if remove_temp and stack.ray_temp_dir_is_tmp:
        shutil.rmtree(stack.ray_temp_dir, ignore_errors=True)
    if remove_temp:
        for d in stack.worker_temp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    if not quiet:
        say("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return stopped
