"""GPU discovery and the MPS daemon's lifecycle (service/launch/gpu.py, gpu_node.py, the stack's ``--mps``).

This machine has no GPU, so NVIDIA's programs are stood in for by tests/fakes (``nvidia-smi -L`` and
an ``nvidia-cuda-mps-control`` that serves a unix socket and exits on ``quit``): these tests check our
side -- directories, environment, start, readiness, errors, stopping exactly our daemon. The real daemon
is exercised by benchmarks/gpu_fill.sh on a GPU machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.launch import gpu
from service.launch.gpu import MpsError, mps_for, running_mps, visible_gpus

FAKES = Path(__file__).resolve().parents[1] / "fakes"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_driver(monkeypatch):
    """tests/fakes first on PATH (one fake GPU), no CUDA_VISIBLE_DEVICES, no MPS settings inherited."""
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    for k in ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "FAKE_MPS_FAIL",
              "BONN_SWEEP_MPS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FAKE_GPUS", "1")


@pytest.fixture
def no_driver(monkeypatch, tmp_path):
    """A PATH without nvidia-smi or the MPS control program."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _daemons(pipe_dir: str) -> list[int]:
    """Pids of fake daemons serving ``pipe_dir`` (from /proc environ)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"nvidia-cuda-mps-control") for c in cmd) and b"-f" in cmd \
                and f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}".encode() in env:
            out.append(int(d.name))
    return out


# -- visible_gpus ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [("0", 1), ("0,1,3", 3), ("", 0), ("-1", 0), (" 2 , 5 ", 2)])
def test_visible_gpus_follows_cuda_visible_devices(monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus() == expected


def test_visible_gpus_counts_nvidia_smi_lines(fake_driver, monkeypatch):
    monkeypatch.setenv("FAKE_GPUS", "4")
    assert visible_gpus() == 4


def test_visible_gpus_is_zero_without_the_driver(no_driver):
    assert visible_gpus() == 0


# -- directories ----------------------------------------------------------------------------------


def test_mps_dirs_live_in_the_folder_when_short(tmp_path):
    mps = mps_for(tmp_path)
    assert mps.pipe_dir == str(tmp_path / "mps" / "pipe") and mps.log_dir == str(tmp_path / "mps" / "log")
    assert (os.stat(mps.pipe_dir).st_mode & 0o777) == 0o700
    assert mps.env() == {"CUDA_MPS_PIPE_DIRECTORY": mps.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": mps.log_dir}


def test_mps_dirs_move_to_a_short_stable_folder_when_the_path_is_too_long(tmp_path):
    deep = tmp_path / ("d" * 90)
    a, b = mps_for(deep), mps_for(deep)
    assert a == b, "the same folder must find the same daemon again"
    assert len(a.pipe_dir) <= gpu.MAX_PIPE_DIR_LEN and not a.pipe_dir.startswith(str(tmp_path))
    assert mps_for(tmp_path / ("e" * 90)) != a


# -- running_mps ----------------------------------------------------------------------------------


def test_running_mps_starts_our_daemon_sets_the_client_env_and_stops_it(fake_driver, tmp_path):
    with running_mps(tmp_path) as mps:
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == mps.pipe_dir
        assert mps.answers()
        pids = _daemons(mps.pipe_dir)
        assert len(pids) == 1
        # a process started inside the block is a client: it reaches the daemon through the env
        out = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert not mps.answers()
    assert not _daemons(mps.pipe_dir)
    assert "command quit" in mps.control_log.read_text(), "stopped by `quit`, not only by a signal"


def test_running_mps_restores_an_earlier_setting(fake_driver, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/somewhere/else")
    with running_mps(tmp_path) as mps:
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == mps.pipe_dir
    assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == "/somewhere/else"


def test_running_mps_stops_the_daemon_when_the_block_raises(fake_driver, tmp_path):
    with pytest.raises(KeyError):
        with running_mps(tmp_path) as mps:
            raise KeyError("boom")
    assert not _daemons(mps.pipe_dir)


def test_no_control_program_is_one_clear_line(no_driver, tmp_path):
    with pytest.raises(MpsError, match="nvidia-cuda-mps-control is not on PATH"):
        with running_mps(tmp_path):
            pass


def test_no_gpu_is_a_clear_error(fake_driver, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_GPUS", "0")
    with pytest.raises(MpsError, match="no NVIDIA GPU is visible"):
        with running_mps(tmp_path):
            pass


def test_a_daemon_that_exits_at_start_is_reported_with_its_log(fake_driver, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "Failed to start: no permission to the GPU (fake)")
    with pytest.raises(MpsError) as err:
        with running_mps(tmp_path):
            pass
    msg = str(err.value)
    assert "exited with code 1 while starting" in msg and "no permission to the GPU (fake)" in msg


def test_a_second_daemon_on_the_same_folder_is_refused(fake_driver, tmp_path):
    with running_mps(tmp_path) as mps:
        with pytest.raises(MpsError, match="already answers"):
            with running_mps(tmp_path):
                pass
        assert mps.answers(), "the refusal must leave the first daemon alone"
        assert len(_daemons(mps.pipe_dir)) == 1


# -- gpu_node (the compose GPU worker's command) ---------------------------------------------------


def _node(args, env_extra, tmp_path, **kw):
    env = {**os.environ, "BONN_SWEEP_MPS_DIR": str(tmp_path / "node"), **env_extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "service.launch.gpu_node", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


PRINT_PIPE = ["--", sys.executable, "-c", "import os; print(os.environ.get('CUDA_MPS_PIPE_DIRECTORY', 'none'))"]


def test_gpu_node_without_mps_only_runs_the_command(fake_driver, tmp_path):
    p = _node(PRINT_PIPE, {}, tmp_path)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == "none", err


def test_gpu_node_runs_the_command_as_an_mps_client_and_stops_the_daemon(fake_driver, tmp_path):
    p = _node(PRINT_PIPE, {"BONN_SWEEP_MPS": "true"}, tmp_path)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    pipe = mps_for(tmp_path / "node").pipe_dir
    assert out.strip() == pipe and "MPS daemon up" in err
    assert not _daemons(pipe)


def test_gpu_node_passes_the_exit_code_and_forwards_sigterm(fake_driver, tmp_path):
    p = _node(["--mps", "--", sys.executable, "-c",
               "import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
               "print('ready', flush=True)\n"
               "time.sleep(60)"], {}, tmp_path)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 7
    assert not _daemons(mps_for(tmp_path / "node").pipe_dir)


def test_gpu_node_says_why_mps_cannot_start(no_driver, tmp_path):
    p = _node(PRINT_PIPE, {"BONN_SWEEP_MPS": "1"}, tmp_path)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and out == ""
    assert err.strip().splitlines() == [err.strip().splitlines()[0]] and "nvidia-cuda-mps-control is not on PATH" in err
    assert "Traceback" not in err


def test_gpu_node_rejects_a_bad_flag_value(tmp_path):
    p = _node(PRINT_PIPE, {"BONN_SWEEP_MPS": "maybe"}, tmp_path)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "BONN_SWEEP_MPS" in err and "'maybe'" in err


# -- the embedded stack's daemon --------------------------------------------------------------------


def test_stack_records_and_stops_its_mps_daemon(fake_driver, tmp_path):
    from service.launch.stack import start_mps, stop_stack
    from service.launch.stack_record import Stack

    stack = Stack(home=str(tmp_path), ray_temp_dir=str(tmp_path / "ray"), ray_temp_dir_is_tmp=False, gcs_port=1,
                  dashboard_port=2, mlflow_port=3, api_port=None, num_cpus=1, num_gpus=1)
    start_mps(stack, dict(os.environ))
    loaded = Stack.load(tmp_path)
    assert loaded.mps_dirs == stack.mps_dirs and loaded.alive() == {"mps": True}
    assert loaded.gpu_env() == {"CUDA_MPS_PIPE_DIRECTORY": stack.mps_dirs[0], "CUDA_MPS_LOG_DIRECTORY": stack.mps_dirs[1]}
    assert stack.mps.answers()
    t0 = time.monotonic()
    assert stop_stack(tmp_path, quiet=True, grace_s=10) == ["mps"]
    assert time.monotonic() - t0 < 8, "quit should end it without waiting out the grace period"
    assert not _daemons(stack.mps_dirs[0]) and not (tmp_path / "stack.json").exists()
    assert "command quit" in loaded.mps.control_log.read_text()


def test_stack_mps_errors_are_stack_errors(no_driver, tmp_path):
    from service.launch.processes import StackError
    from service.launch.stack import start_mps
    from service.launch.stack_record import Stack

    stack = Stack(home=str(tmp_path), ray_temp_dir=str(tmp_path / "ray"), ray_temp_dir_is_tmp=False, gcs_port=1,
                  dashboard_port=2, mlflow_port=3, api_port=None, num_cpus=1, num_gpus=1)
    with pytest.raises(StackError, match="not on PATH"):
        start_mps(stack, dict(os.environ))
    assert "mps" not in stack.procs
