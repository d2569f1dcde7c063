"""The embedded stack for real: Ray head, MLflow server and the API under uvicorn, on free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.launch.api_server import start_api
from service.launch.processes import descendants, proc_start_time, stop_proc
from service.launch.stack import start_stack, stop_stack
from service.launch.stack_record import STACK_FILE, Stack
from tests.conftest import wait_until
from tests.integration.conftest import wait_for_status

pytestmark = pytest.mark.integration

TINY = {
    "name": "tiny",
    "search_space": "digits-smoke",
    "base": {"epochs": 1},
    "budget": {"num_trials": 1, "max_concurrent_trials": 1},
}


@pytest.mark.postgres
def test_healthz_all_components_up(api: httpx.Client) -> None:
    r = api.get("/healthz")
    assert r.status_code == 200, r.text
    comps = r.json()["components"]
    assert all(c["ok"] for c in comps.values()), comps
    assert "ray 2.60.0" in comps["ray"]["detail"]


def test_stack_json_records_processes(stack: Stack) -> None:
    data = json.loads((stack.home_path / STACK_FILE).read_text())
    assert set(data["procs"]) == {"ray", "mlflow", "api", "optuna_dashboard"}
    for name, p in data["procs"].items():
        assert p["pid"] == p["pgid"], f"{name} should lead its own process group"
        assert proc_start_time(p["pid"]) == p["start_time"]
    assert all(stack.alive().values())
    # Ray's socket paths stay short enough
    assert len(stack.ray_temp_dir) <= 40


def test_ports_are_bound_to_loopback_only(stack: Stack) -> None:
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    for port in (stack.api_port, stack.mlflow_port, stack.dashboard_port, stack.optuna_dashboard_port):
        with socket.socket() as s:
            s.settimeout(1.0)
            assert s.connect_ex((ip, port)) != 0, f"port {port} answers on {ip}"


@pytest.mark.postgres
def test_errors_through_real_server(api: httpx.Client) -> None:
    r = api.post("/studies", json={**TINY, "budget": {"num_trials": 0}})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "budget", "num_trials"]
    r = api.post("/studies", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["detail"][0]["msg"]
    r = api.post("/studies", content=b"name: x", headers={"Content-Type": "application/yaml"})
    assert r.status_code == 415
    assert api.get("/studies/doesnotexist").status_code == 404
    assert api.post("/studies/doesnotexist/cancel").status_code == 404


def test_api_never_connects_a_ray_driver(stack: Stack, api: httpx.Client) -> None:
    """The API talks HTTP to the Jobs API; it never calls ray.init() (no DRIVER job from its pid)."""
    api.get("/studies")
    jobs = httpx.get(f"{stack.ray_dashboard_url}/api/jobs/", timeout=10).json()
    api_pid = stack.procs["api"].pid
    drivers = [j for j in jobs if j.get("type") == "DRIVER" and (j.get("driver_info") or {}).get("pid") == str(api_pid)]
    assert drivers == []


def test_study_reaches_a_terminal_state_and_cancel_409(api: httpx.Client, stack: Stack) -> None:
    t0 = time.monotonic()
    r = api.post("/studies", json=TINY)
    latency = time.monotonic() - t0
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] in ("PENDING", "RUNNING"), body
    assert body["links"]["ray_job"].startswith(stack.ray_dashboard_url)
    assert body["links"]["mlflow_run"].startswith(stack.mlflow_uri)
    print(f"POST /studies latency: {latency * 1000:.0f} ms")
    job = httpx.get(f"{stack.ray_dashboard_url}/api/jobs/{body['submission_id']}", timeout=10).json()
    assert job["metadata"] == {"study_id": body["id"], "study_name": "tiny", "bonn_sweep": "1"}
    done = wait_for_status(api, body["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=240)
    r = api.post(f"/studies/{body['id']}/cancel")
    assert r.status_code == 409, r.text
    assert done["status"] in r.json()["detail"][0]["msg"]
    # optuna-dashboard (started with the stack, on the study storage) lists the study; the study links
    # to its page there
    listed = httpx.get(f"{stack.optuna_dashboard_url}/api/studies", timeout=10).json()["study_summaries"]
    sid = {s["study_name"]: s["study_id"] for s in listed}[body["id"]]
    assert done["links"]["optuna_dashboard"] == f"{stack.optuna_dashboard_url}/dashboard/studies/{sid}"


def test_reconcile_after_api_restart(stack: Stack, api: httpx.Client) -> None:
    """A study that ends while the API is down is reconciled when the API comes back."""
    body = api.post("/studies", json={**TINY, "name": "restart"}).json()
    sid, sub = body["id"], body["submission_id"]
    api_proc = stack.procs["api"]
    stop_proc(api_proc, grace_s=15)
    assert not api_proc.alive()

    def job_done() -> str | None:
        st = httpx.get(f"{stack.ray_dashboard_url}/api/jobs/{sub}", timeout=10).json()["status"]
        return st if st in ("SUCCEEDED", "FAILED", "STOPPED") else None

    ray_status = wait_until(job_done, timeout=240, interval=1.0, what="the Ray job to end")
    start_api(stack)
    expected = {"SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED", "STOPPED": "CANCELLED"}[ray_status]
    # the background loop reconciles it without any GET of the study itself
    from service.core.store import StudyStore

    store = StudyStore(stack.settings.store_url or "")
    try:
        wait_until(lambda: store.get(sid).status == expected, timeout=30, what="background reconcile")
    finally:
        store.close()
    assert api.get(f"/studies/{sid}").json()["status"] == expected


def test_cli_against_the_stack(stack: Stack, tmp_path: Path) -> None:
    # the user's shell after `bonn-sweep up`: the CLI finds the key in the home, nothing copied
    env = {**os.environ, "BONN_SWEEP_API_URL": stack.api_url or "", "BONN_SWEEP_HOME": stack.home}
    env.pop("BONN_SWEEP_API_KEY", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=120,
            cwd=tmp_path,
        )

    r = cli("studies", "create", "--preset", "digits-smoke", "--trials", "0", "--set", "epoch=2")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert any("budget.num_trials" in ln for ln in lines), r.stderr

    spec = tmp_path / "study.yaml"
    spec.write_text("name: cli-study\nsearch_space: digits-smoke\nbase: {epochs: 1}\nbudget: {num_trials: 1}\n")
    r = cli("studies", "create", str(spec), "--set", "budget.max_concurrent_trials=1")
    assert r.returncode == 0, r.stderr
    assert "cli-study" in r.stdout
    r = cli("studies", "list")
    assert r.returncode == 0 and "cli-study" in r.stdout
    sid = next(s["id"] for s in httpx.get(f"{stack.api_url}/studies").json()["data"] if s["name"] == "cli-study")
    r = cli("studies", "show", sid)
    assert r.returncode == 0 and sid in r.stdout
    r = cli("studies", "show", "nope")
    assert r.returncode == 1 and "404" in r.stderr and "Traceback" not in r.stderr
    r = cli("studies", "report", sid, "--out", "rep")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "rep" / f"report-{sid}.html").read_text()
    data = json.loads((tmp_path / "rep" / f"report-{sid}.json").read_text())
    assert data["study"]["id"] == sid and data["spec"]["name"] == "cli-study" and sid in page
    r = cli("studies", "report", "nope")
    assert r.returncode == 1 and "404" in r.stderr and "Traceback" not in r.stderr
    r = cli("spaces", "list")
    assert r.returncode == 0 and "digits-smoke" in r.stdout
    r = cli("--api", "http://127.0.0.1:1", "studies", "list")
    assert r.returncode == 1 and "cannot reach the API" in r.stderr


def test_stop_stack_stops_exactly_its_processes(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A second, API-less stack: stop_stack leaves none of its processes and does not touch the
    session's stack."""
    home = tmp_path_factory.mktemp("second") / "h"
    other = start_stack(home, num_cpus=1, with_api=False)
    try:
        pids = {p: proc_start_time(p) for proc in other.procs.values() for p in {proc.pid} | descendants(proc.pid)}
        assert len(pids) > 5
        t0 = time.monotonic()
        stop_stack(home, remove_temp=True)
        took = time.monotonic() - t0
    finally:
        stop_stack(home, remove_temp=True, quiet=True)
    alive = [p for p, st in pids.items() if proc_start_time(p) == st and not _is_zombie(p)]
    assert alive == [], f"left behind: {alive}"
    assert not (home / STACK_FILE).exists()
    assert took < 30
    assert all(stack.alive().values())
    assert httpx.get(f"{stack.api_url}/healthz", timeout=10).status_code == 200


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip
