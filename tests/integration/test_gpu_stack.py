"""``bonn-sweep up --gpus / --mps`` with a real Ray head: the GPUs it offers, and that Ray's workers (where
trials run) are clients of the stack's MPS daemon.

Ray, the Jobs API and the stack's process supervision are real. This machine has no NVIDIA driver, so
two programs of it are stood in for by tests/fakes (``nvidia-smi -L`` and ``nvidia-cuda-mps-control``,
which serves the same control socket): what is checked is our plumbing -- the daemon's directories
reach every Ray worker through the head's environment, GPU fractions are scheduled, ``down`` quits
the daemon -- not MPS itself, which benchmarks/gpu_fill.sh measures on a GPU machine. The CLI's error
paths run with no stand-in: on this machine ``--mps`` must fail with one line and start nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.core.jobs import RayJobsClient
from service.launch.ray_cluster import ray_nodes
from service.launch.stack import start_stack, stop_stack
from service.launch.stack_record import STACK_FILE
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

FAKES = Path(__file__).resolve().parents[1] / "fakes"
REPO = Path(__file__).resolve().parents[2]

# two tasks of half a GPU each: where they run, what MPS settings and GPU ids they see
PROBE = r"""
import json, os, time, ray
ray.init()
@ray.remote(num_gpus=0.5, num_cpus=0)
def probe():
    time.sleep(1.0)
    return {"pid": os.getpid(), "pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
            "gpus": ray.get_gpu_ids(), "t": time.time()}
print("PROBE " + json.dumps(ray.get([probe.remote(), probe.remote()])))
"""


def test_stack_offers_its_gpus_and_trials_are_mps_clients(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GPUS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    home = tmp_path / "h"
    stack = start_stack(home, num_cpus=2, with_api=False, with_optuna_dashboard=False, mps=True)
    try:
        assert stack.num_gpus == 1, "num_gpus=None offers every visible GPU"
        assert set(stack.procs) == {"mps", "ray", "mlflow"} and all(stack.alive().values())
        head = next(n for n in ray_nodes(stack) if n.get("is_head_node"))
        assert float(head["resources_total"].get("GPU", 0)) == 1.0
        assert stack.mps.answers()

        jobs = RayJobsClient(stack.ray_dashboard_url)
        sid = jobs.submit(entrypoint=f"{sys.executable} -c '{PROBE}'", submission_id=f"probe-{int(time.time())}")
        wait_until(lambda: jobs.get(sid).is_terminal, timeout=120, what="probe job")
        logs = jobs.logs(sid)
        assert jobs.get(sid).status == "SUCCEEDED", logs
        seen = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[6:])
        assert [s["pipe"] for s in seen] == [stack.mps_dirs[0]] * 2, "Ray workers must inherit the MPS settings"
        assert [s["gpus"] for s in seen] == [[0], [0]], "two half-GPU tasks share GPU 0"
        assert seen[0]["pid"] != seen[1]["pid"] and abs(seen[0]["t"] - seen[1]["t"]) < 0.9, "they ran side by side"
    finally:
        stopped = stop_stack(home, quiet=True)
    assert "mps" in stopped and not stack.mps.answers()
    assert "command quit" in stack.mps.control_log.read_text()


def _up(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "service", "--home", str(home), "up", *args], env=e,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,env,message", [
    # this machine for real: no NVIDIA driver, no GPU
    (["--mps"], {}, "--mps: the stack offers no GPU"),
    (["--gpus", "1", "--mps"], {}, "nvidia-cuda-mps-control is not on PATH"),
    ([], {"BONN_SWEEP_MPS": "sometimes"}, "BONN_SWEEP_MPS: expected 1/true/yes/on"),
    (["--gpus", "-1"], {}, "--gpus must be 0 or more"),
])
def test_up_refuses_what_cannot_work_in_one_line_and_starts_nothing(tmp_path, args, env, message):
    if os.path.exists("/usr/bin/nvidia-smi") or os.environ.get("CUDA_VISIBLE_DEVICES"):
        pytest.skip("this machine has an NVIDIA driver: these are the GPU-less error paths")
    home = tmp_path / "h"
    r = _up(home, *args, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout
    assert not (home / STACK_FILE).exists() and not (home / "mps").exists()
    assert not list((home / "logs").glob("*.log")) if (home / "logs").exists() else True


def test_up_with_a_daemon_that_fails_says_why_and_leaves_nothing(tmp_path):
    home = tmp_path / "h"
    env = {"PATH": f"{FAKES}{os.pathsep}{os.environ['PATH']}", "FAKE_GPUS": "1",
           "FAKE_MPS_FAIL": "MPS is not supported on this GPU (fake)"}
    r = _up(home, "--mps", env=env)
    assert r.returncode == 1 and "MPS is not supported on this GPU (fake)" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    assert not (home / STACK_FILE).exists()
    wait_until(lambda: not any(p.name.isdigit() and b"service.launch" in _cmdline(p) and str(home).encode() in _cmdline(p)
                               for p in Path("/proc").iterdir()), timeout=10, what="nothing left running")


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""
