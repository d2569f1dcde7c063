"""The Ray side of the embedded stack: the head node (``ray start --head --block`` on 127.0.0.1) and
extra nodes on this machine joined to it (multi-node tests), plus what the head reports about them.

Every Ray server binds to 127.0.0.1: ``ray start --node-ip-address=127.0.0.1`` alone still picks the
machine's address for the GCS, raylet and agents; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's
own switch for single-machine clusters, in :data:`~service.launch.stack_record.ENV_EMBEDDED`) its
node IP is the loopback address and every Ray server binds there. Extra nodes join through
:mod:`service.launch.ray_loopback`, since plain ``ray start --address`` refuses to with that switch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from service.launch.ports import WORKER_PORT_RANGE, PortPicker, free_port_range
from service.launch.processes import Proc, StackError, executable, kill_now, spawn, stop_proc, wait_healthy
from service.launch.stack_record import Stack, server_env

# Ray's unix socket paths live under {temp_dir}/session_<date>_<pid>/sockets/... and must stay under
# ~107 chars; beyond this many chars for the temp dir itself we use a short folder under /tmp.
MAX_RAY_TEMP_DIR_LEN = 40
#: ``stack.procs`` names of extra Ray nodes start with this
WORKER_NODE_PREFIX = "ray-worker"


def ray_temp_dir_for(home: Path) -> tuple[Path, bool]:
    """``{home}/ray`` if short enough for Ray's socket paths, else a fresh short dir under /tmp."""
    candidate = home / "ray"
    if len(str(candidate)) <= MAX_RAY_TEMP_DIR_LEN:
        return candidate, False
    return Path(tempfile.mkdtemp(prefix="bsray-", dir="/tmp")), True


# -- the head -------------------------------------------------------------------------------------


def spawn_ray_head(stack: Stack, ports: PortPicker, env: dict[str, str], *, object_store_mb: int = 300) -> subprocess.Popen:
    """Start the head node of ``stack`` (not waiting for it: :func:`ray_jobs_ready`); recorded as
    ``stack.procs["ray"]``. Its internal ports come from ``ports``. It offers ``stack.num_gpus`` GPUs to
    trials, and with MPS its processes (trials included) are clients of the stack's daemon."""
    internal_ports = {
        "--node-manager-port": ports.pick(),
        "--object-manager-port": ports.pick(),
        "--ray-client-server-port": ports.pick(),
        "--dashboard-agent-listen-port": ports.pick(),
        "--dashboard-agent-grpc-port": ports.pick(),
        "--runtime-env-agent-port": ports.pick(),
        "--metrics-export-port": ports.pick(),
    }
    wlo, whi = free_port_range(WORKER_PORT_RANGE, exclude=ports.used)
    cmd = [
        executable("ray"), "start", "--head", "--block",
        f"--temp-dir={stack.ray_temp_dir}",
        "--port", str(stack.gcs_port),
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--dashboard-port", str(stack.dashboard_port),
        "--include-dashboard=true",
        "--num-cpus", str(stack.num_cpus),
        "--num-gpus", str(stack.num_gpus),
        "--object-store-memory", str(object_store_mb * 1024 * 1024),
        "--min-worker-port", str(wlo),
        "--max-worker-port", str(whi),
        "--disable-usage-stats",
    ]
    for flag, port in internal_ports.items():
        cmd += [flag, str(port)]
    home = Path(stack.home)
    proc, popen = spawn("ray", cmd, home / "logs" / "ray.log", {**env, **stack.gpu_env()}, cwd=home)
    stack.procs["ray"] = proc
    stack.save()
    return popen


def ray_jobs_ready(dashboard_url: str) -> Callable[[], bool]:
    """A health check: the dashboard answers and its job API is up (the API submits studies there)."""

    def check() -> bool:
        r = httpx.get(f"{dashboard_url}/api/version", timeout=2.0)
        if r.status_code != 200:
            return False
        r = httpx.get(f"{dashboard_url}/api/jobs/", timeout=5.0)
        return r.status_code == 200

    return check


def ray_nodes(stack: Stack, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every node the head knows (alive and dead), from the dashboard's state API: dicts with
    ``node_id``, ``state`` (ALIVE/DEAD), ``is_head_node``, ``resources_total``, ..."""
    r = httpx.get(f"{stack.ray_dashboard_url}/api/v0/nodes", params={"limit": 1000, "detail": "true"},
                  timeout=timeout_s)
    r.raise_for_status()
    data = r.json()
    inner = data.get("data", {}).get("result", {})
    return list(inner.get("result", inner) if isinstance(inner, dict) else inner)


# -- more Ray nodes on this machine (multi-node tests) ---------------------------------------------


def start_ray_worker(
    stack: Stack,
    *,
    name: str = WORKER_NODE_PREFIX,
    num_cpus: float = 1,
    num_gpus: float = 0,
    resources: dict[str, float] | None = None,
    object_store_mb: int = 200,
    timeout_s: float = 90.0,
    extra_env: dict[str, str] | None = None,
) -> tuple[Proc, str]:
    """Start one more Ray node on this machine, joined to ``stack``'s head: ``ray start
    --address=<head GCS> --block`` as a child process in its own session, with free ports of its own
    and its own short ``--temp-dir`` (Ray 2.60 allows one per node; every node's unix sockets then live
    apart). Recorded in ``stack.procs[name]`` (``name`` must start with ``ray-worker``), so
    :func:`service.launch.stack.stop_stack` stops it too. Waits until the head lists the new node ALIVE
    with its resources; returns ``(proc, node_id)``.
    """
    if not name.startswith(WORKER_NODE_PREFIX):
        raise StackError(f"worker node names start with {WORKER_NODE_PREFIX!r} (got {name!r})")
    old = stack.procs.get(name)
    if old is not None and old.alive():
        raise StackError(f"{name} is already running (pid {old.pid})")
    home = Path(stack.home)
    before = {n.get("node_id") for n in ray_nodes(stack)}
    ports = PortPicker({stack.gcs_port, stack.dashboard_port, stack.mlflow_port, *([stack.api_port] if stack.api_port else [])})
    internal_ports = {
        "--node-manager-port": ports.pick(),
        "--object-manager-port": ports.pick(),
        "--dashboard-agent-listen-port": ports.pick(),
        "--dashboard-agent-grpc-port": ports.pick(),
        "--runtime-env-agent-port": ports.pick(),
        "--metrics-export-port": ports.pick(),
    }
    wlo, whi = free_port_range(WORKER_PORT_RANGE, exclude=ports.used)
    temp_dir = stack.worker_temp_dirs.get(name) or tempfile.mkdtemp(prefix="bsrayw-", dir="/tmp")
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "service.launch.ray_loopback", "start", "--block",  # `ray start`, loopback-only
        f"--address={stack.ray_address}",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus", str(num_cpus),
        "--num-gpus", str(num_gpus),
        "--object-store-memory", str(object_store_mb * 1024 * 1024),
        "--min-worker-port", str(wlo),
        "--max-worker-port", str(whi),
        "--disable-usage-stats",
    ]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    for flag, port in internal_ports.items():
        cmd += [flag, str(port)]
    proc, popen = spawn(name, cmd, home / "logs" / f"{name}.log", {**server_env(extra_env), **stack.gpu_env()},
                        cwd=home)
    stack.procs[name] = proc
    stack.worker_temp_dirs[name] = temp_dir
    stack.save()
    found: dict[str, str] = {}

    def registered() -> bool:
        for n in ray_nodes(stack):
            if n.get("node_id") in before or n.get("state") != "ALIVE":
                continue
            total = n.get("resources_total") or {}
            if all(float(total.get(k, -1)) == float(v) for k, v in (resources or {}).items()):
                found["node_id"] = n["node_id"]
                return True
        return False

    try:
        wait_healthy(name, registered, proc, popen, timeout_s)
    except BaseException:
        stop_ray_worker(stack, name, hard=True)
        raise
    return proc, found["node_id"]


def stop_ray_worker(stack: Stack, name: str = WORKER_NODE_PREFIX, *, hard: bool = False,
                    grace_s: float = 20.0) -> bool:
    """Stop a node started by :func:`start_ray_worker`. ``hard=True`` simulates losing the machine:
    SIGKILL at once to its process group and every descendant (raylet, object store, workers, trial
    actors). Returns whether something was running."""
    proc = stack.procs.pop(name, None)
    stack.save()
    if proc is None or not proc.alive():
        return False
    if hard:
        kill_now(proc)
    else:
        stop_proc(proc, grace_s=grace_s)
    return True
