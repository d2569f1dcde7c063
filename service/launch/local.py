"""The embedded default: a local Ray head, an MLflow server and the API, started and stopped by pid.

``start_stack(home)`` starts the three as child processes, each in its own session/process group
(``start_new_session=True``), on 127.0.0.1 and on ports of its own (free ones, or the usual 8265 /
5000 / 8000 when ``prefer_default_ports`` and they are free), waits until each answers its health
check and writes everything needed to stop them into ``{home}/stack.json``. ``stop_stack(home)``
stops exactly those processes: SIGTERM to each recorded leader, then to its process group, a grace
period, then SIGKILL to whatever is left of those groups and of the recorded processes' descendants -- never anything
else (``ray stop`` would kill every Ray cluster on the machine, colleagues' included).

Every server of the embedded stack listens on 127.0.0.1 only (tests/integration/test_security_e2e.py
reads the listening sockets of every process of the stack from /proc). Ray needs a nudge for that:
``ray start --node-ip-address=127.0.0.1`` alone still picks the machine's address and binds the GCS,
raylet and agents to it or to all interfaces; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's own
switch for single-machine clusters) its node IP is the loopback address and every Ray server binds
there. Extra nodes (:func:`start_ray_worker`, multi-node tests) join through
:mod:`service.launch.ray_loopback`, since plain ``ray start --address`` refuses to with that switch.

The API needs a key for every write: :func:`start_stack` makes sure ``{home}/api-key`` (mode 0600)
holds a key the store knows (service/core/auth.py); the CLI and :meth:`Stack.env` pick it up from there.

Ray runs with ``RAY_AUTH_MODE=disabled``: the embedded stack binds every port to 127.0.0.1, and token
auth would otherwise write ``~/.ray/auth_token``, which then turns token auth on for every later
cluster and client of this user. The compose deployment documents how to run with a token
(``BONN_SWEEP_RAY_AUTH_TOKEN``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

STACK_FILE = "stack.json"
# Ray's unix socket paths live under {temp_dir}/session_<date>_<pid>/sockets/... and must stay under
# ~107 chars; beyond this many chars for the temp dir itself we use a short folder under /tmp.
MAX_RAY_TEMP_DIR_LEN = 40
WORKER_PORT_RANGE = 100

ENV_EMBEDDED = {
    "RAY_AUTH_MODE": "disabled",
    # Ray's node IP = 127.0.0.1, so that GCS, raylet, agents and workers listen on loopback only
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


class StackError(RuntimeError):
    pass


# -- ports ------------------------------------------------------------------------------------------


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    # also refuse ports something listens on via 0.0.0.0 / another interface
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) != 0


def free_port(exclude: Iterable[int] = ()) -> int:
    """A port that is free right now on 127.0.0.1 (the OS's choice), not in ``exclude``."""
    excluded = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in excluded:
            return port
    raise StackError("no free port found")


def free_port_range(n: int, exclude: Iterable[int] = (), lo: int = 20000, hi: int = 60000) -> tuple[int, int]:
    """``n`` consecutive free ports (for Ray's worker port range)."""
    excluded = set(exclude)
    for _ in range(200):
        start = random.randrange(lo, hi - n)
        ports = range(start, start + n)
        if excluded.isdisjoint(ports) and all(port_is_free(p) for p in ports):
            return start, start + n - 1
    raise StackError(f"no range of {n} free ports found")


# -- process bookkeeping --------------------------------------------------------------------------


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) from /proc: with the pid, identifies a process uniquely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _proc_pgid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[2])


def _all_ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    ppids = _all_ppids()
    children: dict[int, list[int]] = {}
    for p, pp in ppids.items():
        children.setdefault(pp, []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _group_members(pgid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _proc_pgid(int(d.name)) == pgid:
            out.add(int(d.name))
    return out


@dataclass
class Proc:
    name: str
    pid: int
    pgid: int
    start_time: int | None
    log: str
    cmd: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        """Still the process we started (same pid and start time) and not a zombie."""
        st = _proc_start_time(self.pid)
        if st is None or st != self.start_time:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text()
            return state[state.rindex(")") + 2] != "Z"
        except OSError:
            return False


def _spawn(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> tuple[Proc, subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,
        )
    return Proc(name, popen.pid, popen.pid, _proc_start_time(popen.pid), str(log), cmd), popen


def _tail(path: str | Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


# -- the stack ------------------------------------------------------------------------------------


@dataclass
class Stack:
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

    # -- addresses --------------------------------------------------------------------------------
    @property
    def api_url(self) -> str | None:
        return f"http://127.0.0.1:{self.api_port}" if self.api_port else None

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
        )

    def alive(self) -> dict[str, bool]:
        return {name: p.alive() for name, p in self.procs.items()}

    # -- persistence ------------------------------------------------------------------------------
    def save(self) -> None:
        path = Path(self.home) / STACK_FILE
        tmp = path.with_suffix(".tmp")
        data = asdict(self)
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, home: str | Path) -> Stack | None:
        path = Path(home).absolute() / STACK_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        procs = {k: Proc(**v) for k, v in data.pop("procs", {}).items()}
        return cls(**data, procs=procs)


def ray_temp_dir_for(home: Path) -> tuple[Path, bool]:
    """``{home}/ray`` if short enough for Ray's socket paths, else a fresh short dir under /tmp."""
    candidate = home / "ray"
    if len(str(candidate)) <= MAX_RAY_TEMP_DIR_LEN:
        return candidate, False
    return Path(tempfile.mkdtemp(prefix="bsray-", dir="/tmp")), True


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _wait(name: str, check: Callable[[], bool], proc: Proc, popen: subprocess.Popen | None, timeout_s: float) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if popen is not None and popen.poll() is not None:
            raise StackError(f"{name} exited with code {popen.returncode} while starting; log {proc.log}:\n{_tail(proc.log)}")
        if time.monotonic() - t0 > timeout_s:
            raise StackError(f"{name} not healthy after {timeout_s:.0f}s; log {proc.log}:\n{_tail(proc.log)}")
        time.sleep(0.25)


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        r = httpx.get(url, timeout=2.0)
        return r.status_code == 200

    return check


def _ray_jobs_ready(dashboard_url: str) -> Callable[[], bool]:
    def check() -> bool:
        r = httpx.get(f"{dashboard_url}/api/version", timeout=2.0)
        if r.status_code != 200:
            return False
        r = httpx.get(f"{dashboard_url}/api/jobs/", timeout=5.0)
        return r.status_code == 200

    return check


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
) -> Stack:
    """Start Ray head + MLflow server (+ API) for ``home``; returns the running :class:`Stack`.

    If ``{home}/stack.json`` describes a stack whose processes are all alive, that stack is returned
    unchanged; a stale file is cleaned up (its leftovers stopped) first.
    """
    say = log or (lambda _m: None)
    home = Path(home).expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)

    existing = Stack.load(home)
    if existing is not None:
        alive = existing.alive()
        if alive and all(alive.values()) and (existing.api_port is not None or not with_api):
            say(f"stack already running (home {home})")
            if with_api:
                ensure_stack_key(home, extra_env)
            return existing
        say("found a stale stack.json: stopping its leftovers")
        stop_stack(home)

    num_cpus = num_cpus or os.cpu_count() or 1
    used: set[int] = set()

    def pick(default: int | None = None) -> int:
        if prefer_default_ports and default and default not in used and port_is_free(default):
            used.add(default)
            return default
        p = free_port(used)
        used.add(p)
        return p

    dashboard_port = pick(8265)
    mlflow_port = pick(5000)
    api_port = pick(8000) if with_api else None
    gcs_port = pick()
    ray_ports = {
        "--node-manager-port": pick(),
        "--object-manager-port": pick(),
        "--ray-client-server-port": pick(),
        "--dashboard-agent-listen-port": pick(),
        "--dashboard-agent-grpc-port": pick(),
        "--runtime-env-agent-port": pick(),
        "--metrics-export-port": pick(),
    }
    wlo, whi = free_port_range(WORKER_PORT_RANGE, exclude=used)
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
        num_cpus=num_cpus,
    )
    base_env = {**os.environ, **ENV_EMBEDDED, **(extra_env or {})}
    # The driver runs as a Ray job: make this source tree importable there even without `pip install -e`.
    root = str(Path(__file__).resolve().parent.parent)
    base_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, base_env.get("PYTHONPATH", "")) if p)
    popens: dict[str, subprocess.Popen] = {}
    t_start = time.monotonic()
    try:
        # (a) Ray head
        ray_cmd = [
            _bin("ray"), "start", "--head", "--block",
            f"--temp-dir={temp_dir}",
            "--port", str(gcs_port),
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--dashboard-port", str(dashboard_port),
            "--include-dashboard=true",
            "--num-cpus", str(num_cpus),
            "--num-gpus", "0",
            "--object-store-memory", str(object_store_mb * 1024 * 1024),
            "--min-worker-port", str(wlo),
            "--max-worker-port", str(whi),
            "--disable-usage-stats",
        ]
        for flag, port in ray_ports.items():
            ray_cmd += [flag, str(port)]
        proc, popens["ray"] = _spawn("ray", ray_cmd, home / "logs" / "ray.log", base_env, cwd=home)
        stack.procs["ray"] = proc
        stack.save()
        say(f"starting Ray head (dashboard :{dashboard_port}, GCS :{gcs_port}, temp dir {temp_dir})")

        # (b) MLflow server
        (home / "mlartifacts").mkdir(exist_ok=True)
        mlflow_cmd = [
            _bin("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
            "--artifacts-destination", str(home / "mlartifacts"),
            "--host", "127.0.0.1",
            "--port", str(mlflow_port),
            "--workers", "1",
        ]
        proc, popens["mlflow"] = _spawn("mlflow", mlflow_cmd, home / "logs" / "mlflow.log", base_env, cwd=home)
        stack.procs["mlflow"] = proc
        stack.save()
        say(f"starting MLflow server (:{mlflow_port}, backend sqlite:///{home}/mlflow.db)")

        stack.timings["ray_s"] = round(
            _wait("Ray head", _ray_jobs_ready(stack.ray_dashboard_url), stack.procs["ray"], popens["ray"], timeout_s), 2
        )
        say(f"Ray head up in {stack.timings['ray_s']:.1f}s")
        stack.timings["mlflow_s"] = round(
            _wait("MLflow server", _http_ok(f"{stack.mlflow_uri}/health"), stack.procs["mlflow"], popens["mlflow"], timeout_s)
            + stack.timings["ray_s"], 2
        )
        say(f"MLflow up after {stack.timings['mlflow_s']:.1f}s")

        # (c) API, with a key for the local user
        if with_api:
            ensure_stack_key(home, extra_env)
            say(f"starting API (:{api_port})")
            start_api(stack, base_env=base_env)
            say(f"API up in {stack.timings['api_s']:.1f}s")
    except BaseException:
        stop_stack(home, quiet=True)
        raise
    stack.timings["total_s"] = round(time.monotonic() - t_start, 2)
    stack.save()
    return stack


def ensure_stack_key(home: Path, extra_env: dict[str, str] | None = None) -> str:
    """The local user's key for the stack in ``home`` (created if missing), in the store the API uses."""
    from service.core.auth import ensure_local_key
    from service.core.settings import Settings

    url = (extra_env or {}).get("BONN_SWEEP_STORE_URL") or Settings(home=home).store_url or ""
    Settings(home=home, store_url=url).ensure_dirs()
    return ensure_local_key(home, url)


def start_api(stack: Stack, *, base_env: dict[str, str] | None = None, timeout_s: float = 60.0) -> Proc:
    """(Re)start the API of ``stack`` under uvicorn on ``stack.api_port``; records it in stack.json.
    A running API of this stack is stopped first (e.g. to test the reconcile after an API restart)."""
    if stack.api_port is None:
        raise StackError("this stack was started without an API port")
    old = stack.procs.get("api")
    if old is not None and old.alive():
        _stop_proc(old, grace_s=15.0)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(base_env or {**os.environ, **ENV_EMBEDDED})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(stack.env())
    env.pop("BONN_SWEEP_API_KEY", None)  # a client's key: the server has the hashes
    cmd = [
        sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(stack.api_port), "--log-level", "info",
    ]
    proc, popen = _spawn("api", cmd, Path(stack.home) / "logs" / "api.log", env, cwd=Path(root))
    stack.procs["api"] = proc
    stack.save()
    stack.timings["api_s"] = round(_wait("API", _http_ok(f"{stack.api_url}/healthz"), proc, popen, timeout_s), 2)
    stack.save()
    return proc


def stop_stack(
    home: str | Path | Stack,
    *,
    grace_s: float = 20.0,
    remove_temp: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Stop what :func:`start_stack` recorded for ``home``; returns the names of processes stopped.

    Order: API first (no new submissions), then Ray (its jobs get SIGTERM through the head), then
    MLflow (last, so a stopping driver can still log). Each leader gets SIGTERM, then the rest of
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
    for name in ("api", *workers, "ray", "mlflow"):
        proc = stack.procs.get(name)
        if proc is None or not proc.alive():
            continue
        _stop_proc(proc, grace_s=grace_s, say=say)
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


# -- more Ray nodes on this machine (multi-node tests) ---------------------------------------------

WORKER_NODE_PREFIX = "ray-worker"


def ray_nodes(stack: Stack, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every node the head knows (alive and dead), from the dashboard's state API: dicts with
    ``node_id``, ``state`` (ALIVE/DEAD), ``is_head_node``, ``resources_total``, ..."""
    r = httpx.get(f"{stack.ray_dashboard_url}/api/v0/nodes", params={"limit": 1000, "detail": "true"},
                  timeout=timeout_s)
    r.raise_for_status()
    data = r.json()
    inner = data.get("data", {}).get("result", {})
    return list(inner.get("result", inner) if isinstance(inner, dict) else inner)


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
    :func:`stop_stack` stops it too. Waits until the head lists the new node ALIVE with its resources;
    returns ``(proc, node_id)``.
    """
    if not name.startswith(WORKER_NODE_PREFIX):
        raise StackError(f"worker node names start with {WORKER_NODE_PREFIX!r} (got {name!r})")
    old = stack.procs.get(name)
    if old is not None and old.alive():
        raise StackError(f"{name} is already running (pid {old.pid})")
    home = Path(stack.home)
    before = {n.get("node_id") for n in ray_nodes(stack)}
    used = {stack.gcs_port, stack.dashboard_port, stack.mlflow_port, *([stack.api_port] if stack.api_port else [])}

    def pick() -> int:
        p = free_port(used)
        used.add(p)
        return p

    ports = {
        "--node-manager-port": pick(),
        "--object-manager-port": pick(),
        "--dashboard-agent-listen-port": pick(),
        "--dashboard-agent-grpc-port": pick(),
        "--runtime-env-agent-port": pick(),
        "--metrics-export-port": pick(),
    }
    wlo, whi = free_port_range(WORKER_PORT_RANGE, exclude=used)
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
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    env = {**os.environ, **ENV_EMBEDDED, **(extra_env or {})}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc, popen = _spawn(name, cmd, home / "logs" / f"{name}.log", env, cwd=home)
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
        _wait(name, registered, proc, popen, timeout_s)
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
        _kill_now(proc)
    else:
        _stop_proc(proc, grace_s=grace_s)
    return True


def _snapshot(proc: Proc) -> dict[int, int | None]:
    """Start time of the leader, its descendants and its group members, to tell them from reused pids."""
    return {p: _proc_start_time(p) for p in {proc.pid} | _descendants(proc.pid) | _group_members(proc.pgid)}


def _wait_reaped(proc: Proc) -> None:
    """Up to 5 s for the leader to be gone (reaped, a zombie, or its pid reused)."""
    for _ in range(50):
        _reap(proc.pid)
        if _proc_start_time(proc.pid) != proc.start_time or _zombie(proc.pid):
            break
        time.sleep(0.1)


def _kill_now(proc: Proc) -> None:
    targets = _snapshot(proc)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pgid, signal.SIGKILL)
    for p, st in targets.items():
        if st is not None and _proc_start_time(p) == st:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
    _wait_reaped(proc)


def _stop_proc(proc: Proc, *, grace_s: float, say: Callable[[str], None] = lambda _m: None) -> None:
    """SIGTERM the leader, then its group; SIGKILL what is left of the group and of the leader's
    descendants after ``grace_s``. Every pid is checked against its recorded start time, and the
    group is signalled only while one of its recorded members lives (so the pgid is still ours)."""
    targets = _snapshot(proc)

    def ours(p: int) -> bool:
        st = targets.get(p)
        return st is not None and _proc_start_time(p) == st and not _zombie(p)

    def signal_group(sig: int) -> None:
        if any(ours(p) for p in _group_members(proc.pgid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pgid, sig)

    say(f"stopping {proc.name} (pgid {proc.pgid}, {len(targets)} processes)")
    # SIGTERM the leader first: `ray start --block` then shuts its services down in order (~4 s);
    # signalling the whole group at once makes raylet and the autoscaler monitor linger (~20 s).
    if ours(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    leader_gone = False
    while time.monotonic() < deadline:
        _reap(proc.pid)
        if not any(ours(p) for p in targets):
            break
        if not leader_gone and not proc.alive():
            # The leader is done; the rest of its group gets SIGTERM and a short grace
            # (multiprocessing's resource_tracker ignores SIGTERM: SIGKILL below).
            leader_gone = True
            signal_group(signal.SIGTERM)
            deadline = min(deadline, time.monotonic() + 3.0)
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
    for p in targets:
        if ours(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
    _wait_reaped(proc)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    except OSError:
        return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# -- watchdog: stop a stack when the process that started it dies (e.g. a killed pytest) ------------


def spawn_watchdog(home: str | Path, parent_pid: int | None = None) -> subprocess.Popen:
    """A detached ``python -m service.launch.local watch`` that stops ``home``'s stack once ``parent_pid``
    (default: this process) is gone. Kill it (by its pid) after a normal :func:`stop_stack`."""
    parent_pid = parent_pid or os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "service.launch.local", "watch", str(Path(home).absolute()), str(parent_pid),
         str(_proc_start_time(parent_pid) or 0)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def _watch(home: str, parent_pid: int, parent_start: int) -> None:
    while _proc_start_time(parent_pid) == parent_start and not _zombie(parent_pid):
        time.sleep(1.0)
    stop_stack(home, remove_temp=True, quiet=True)


if __name__ == "__main__":  # python -m service.launch.local watch HOME PID START
    if len(sys.argv) == 5 and sys.argv[1] == "watch":
        _watch(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        print("usage: python -m service.launch.local watch HOME PARENT_PID PARENT_START_TIME", file=sys.stderr)
        sys.exit(2)
