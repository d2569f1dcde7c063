"""Security of the embedded stack for real: every listening socket of every process it started is on
loopback, and the API's keys and limits answer over real HTTP (uvicorn) with the stack's own store."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.core.auth import key_id_of
from service.launch.processes import descendants, group_members
from service.launch.stack_record import Stack
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

TINY = {"name": "sec", "search_space": "digits-smoke", "base": {"epochs": 1},
        "budget": {"num_trials": 1, "max_concurrent_trials": 1}}


# -- listening sockets --------------------------------------------------------------------------------


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out[target[8:-1]] = pid
    return out


def _decode(addr_hex: str, v6: bool) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    ip_hex, port_hex = addr_hex.split(":")
    raw = bytes.fromhex(ip_hex)
    if v6:  # four host-order 32-bit words
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return ipaddress.IPv6Address(raw), int(port_hex, 16)
    return ipaddress.IPv4Address(raw[::-1]), int(port_hex, 16)


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """``(address, port, pid)`` of every TCP socket in LISTEN state owned by ``pids`` (from /proc/net)."""
    inodes = _socket_inodes(pids)
    found = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                ip, port = _decode(f[1], v6)
                found.append((str(ip), port, inodes[f[9]]))
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120]
    except OSError:
        return "?"


def test_every_server_of_the_stack_listens_on_loopback_only(stack: Stack) -> None:
    """Ray (GCS, raylet, dashboard, agents, workers), MLflow and the API: each listening socket of each
    process the stack started (and of their descendants) is bound to 127.0.0.1 / ::1, never to a
    wildcard or the machine's address."""
    pids: set[int] = set()
    for proc in stack.procs.values():
        pids |= {proc.pid} | descendants(proc.pid) | group_members(proc.pgid)
    sockets = listening_sockets(pids)
    ports = {port for _, port, _ in sockets}
    # the three servers the user talks to are among them (so the inspection itself works)
    assert {stack.api_port, stack.mlflow_port, stack.dashboard_port, stack.gcs_port} <= ports, sockets
    exposed = [(a, p, _cmd(pid)) for a, p, pid in sockets if not _is_loopback(a)]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_api_not_reachable_on_the_machines_address(stack: Stack) -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
    except OSError:
        pytest.skip("no route")
    if ip.startswith("127."):
        pytest.skip("no non-loopback address on this machine")
    for port in (stack.api_port, stack.mlflow_port, stack.dashboard_port, stack.gcs_port):
        with socket.socket() as s:
            s.settimeout(1.0)
            assert s.connect_ex((ip, port)) != 0, f"port {port} answers on {ip}"


# -- keys and limits over real HTTP -----------------------------------------------------------------------


def test_local_key_file_is_private_and_not_stored_in_plaintext(stack: Stack) -> None:
    path = stack.home_path / "api-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = stack.api_key
    assert key and key_id_of(key)
    db = stack.home_path / "studies.db"
    assert key.encode() not in db.read_bytes()


@pytest.mark.postgres
def test_auth_over_http(stack: Stack, api: httpx.Client) -> None:
    url = stack.api_url or ""
    r = httpx.post(f"{url}/studies", json=TINY, timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["detail"][0]["loc"] == ["header", "Authorization"]
    r = httpx.post(f"{url}/studies/x/cancel", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 403 and r.json()["detail"][0]["type"] == "invalid_api_key"
    assert httpx.get(f"{url}/studies", timeout=30).status_code == 200  # reads open by default
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200


@pytest.mark.postgres
def test_keys_created_and_revoked_with_the_cli(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "BONN_SWEEP_HOME": stack.home}
    r = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--name", "e2e"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    url = stack.api_url or ""
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{url}/studies/nope/cancel", headers=auth, timeout=30).status_code == 404  # past auth
    r = subprocess.run([sys.executable, "-m", "service", "keys", "revoke", key_id_of(key) or ""], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: httpx.post(f"{url}/studies/nope/cancel", headers=auth, timeout=30).status_code == 403,
               timeout=30, what="the revoked key to be refused")


@pytest.mark.postgres
def test_limits_over_http(stack: Stack, api: httpx.Client) -> None:
    settings = stack.settings
    # 413: larger than api_max_body_bytes, refused before it is parsed
    big = {**TINY, "search_space": {"description": "x" * (settings.api_max_body_bytes + 1)}}
    r = api.post("/studies", json=big)
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body"]
    # 422: trials per study
    r = api.post("/studies", json={**TINY, "budget": {"num_trials": settings.max_trials_per_study + 1}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "budget", "num_trials"]
    # 422: a data path escaping the data directories (.. and a symlink)
    data = stack.home_path / "datasets"
    data.mkdir(exist_ok=True)
    link = data / "etc-link"
    if not link.exists():
        link.symlink_to("/etc")
    for path in (f"{stack.home}/../../etc/passwd", f"{link}/passwd", "/etc/passwd"):
        r = api.post("/studies", json={**TINY, "base": {"dataset": "npz", "data_root": path}})
        assert r.status_code == 422, r.text
        d = r.json()["detail"][0]
        assert d["loc"] == ["body", "base", "data_root"] and d["type"] == "path_not_allowed", d
    # a path inside home (a default data directory) passes the check; the body is otherwise invalid
    r = api.post("/studies", json={**TINY, "base": {"dataset": "npz", "data_root": f"{data}/x.npz"},
                                   "budget": {"num_trials": 0}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "budget", "num_trials"]
