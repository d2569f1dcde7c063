"""The GPUs of this machine, and an NVIDIA MPS control daemon owned by whoever starts it.

Without MPS, CUDA processes that share a GPU are time-sliced: their kernels never overlap, so N
small trials on one card (``resources.gpus_per_trial: 1/N``) run little faster together than one
after the other. With MPS (Multi-Process Service) the kernels of all client processes run on the GPU
at once. A client uses MPS when its CUDA driver finds a control daemon through
``CUDA_MPS_PIPE_DIRECTORY``; a daemon started with private pipe and log directories serves only the
processes given that environment (:meth:`Mps.env`), so a daemon of ours never changes how anyone
else's CUDA programs run, and we stop exactly it.

* :func:`visible_gpus` counts the GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else
  ``nvidia-smi -L``); 0 without the NVIDIA driver.
* :func:`mps_for` picks the daemon's directories for a folder (short enough for a unix socket path),
  :func:`mps_command` is the foreground daemon command (``nvidia-cuda-mps-control -f``, so the daemon is
  our child and is stopped by pid like the rest of a stack), :func:`wait_mps_ready` waits until it
  answers, :meth:`Mps.quit` asks it to exit.
* :func:`running_mps` does all of it around a block (benchmarks, the compose GPU worker).

Every failure is an :class:`MpsError` with one line saying why (no NVIDIA driver, no GPU, the daemon
exited: its log's last lines). Standard library only: the GPU benchmarks import this on machines
without the service's dependencies. Users: service/launch/stack.py (``bonn-sweep up --mps``),
service/launch/gpu_node.py (the compose GPU worker), benchmarks/bench_shared_gpu.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MPS_CONTROL", "Mps", "MpsError", "env_flag", "mps_command", "mps_for", "prepare_mps", "running_mps",
           "visible_gpus", "wait_mps_ready"]

#: the MPS control program (ships with the NVIDIA driver)
MPS_CONTROL = "nvidia-cuda-mps-control"
#: unix socket paths are limited to 107 bytes; the daemon puts ``control`` and per-server sockets
#: (``mps_<n>``-like names) into the pipe directory
MAX_PIPE_DIR_LEN = 80


class MpsError(RuntimeError):
    """The MPS daemon cannot start (or answer): the message says why in one line, plus a log tail."""


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment variable (1/true/yes/on, 0/false/no/off; unset or empty: ``default``);
    ValueError naming it otherwise."""
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected 1/true/yes/on or 0/false/no/off, got {raw!r}")


def visible_gpus() -> int:
    """How many GPUs CUDA programs started from here may use: the entries of ``CUDA_VISIBLE_DEVICES``
    when it is set (empty or ``-1``: none), else the ``GPU n:`` lines of ``nvidia-smi -L``; 0 when there
    is no NVIDIA driver."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        entries = [v.strip() for v in vis.split(",") if v.strip()]
        if not entries or entries[0].startswith("-"):
            return 0
        return len(entries)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


@dataclass(frozen=True)
class Mps:
    """Where one MPS control daemon keeps its sockets (``pipe_dir``) and logs (``log_dir``)."""

    pipe_dir: str
    log_dir: str

    def env(self) -> dict[str, str]:
        """Environment that makes a CUDA process a client of this daemon (and the control program talk
        to it)."""
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    @property
    def control_log(self) -> Path:
        return Path(self.log_dir) / "control.log"

    def control(self, command: str, timeout_s: float = 10.0) -> subprocess.CompletedProcess:
        """Send one command (``get_server_list``, ``quit``, ...) to this daemon through the control program."""
        return subprocess.run([_control_program()], input=command + "\n",
                              capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **self.env()})

    def answers(self) -> bool:
        """The daemon's control socket exists and it answers ``get_server_list``."""
        if not (Path(self.pipe_dir) / "control").exists():
            return False
        try:
            return self.control("get_server_list", timeout_s=5.0).returncode == 0
        except (OSError, subprocess.TimeoutExpired, MpsError):
            return False

    def quit(self, timeout_s: float = 10.0) -> bool:
        """Ask the daemon to exit (it stops its MPS servers first); True if it took the command."""
        try:
            return self.control("quit", timeout_s=timeout_s).returncode == 0
        except (OSError, subprocess.TimeoutExpired, MpsError):
            return False

    def log_tail(self, n: int = 8) -> str:
        try:
            lines = self.control_log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no control.log)"
        return "\n".join(lines[-n:]) or "(control.log is empty)"


def mps_for(folder: str | Path, create: bool = True) -> Mps:
    """The directories of the MPS daemon that belongs to ``folder`` (a stack's home, a benchmark's work
    dir): ``{folder}/mps/{pipe,log}``, or, when that pipe path is too long for a unix socket, a folder
    under /tmp named after ``folder`` (so it is found again by the same folder). Created, mode 0700,
    unless ``create`` is false (a check before starting: a refused start leaves nothing behind)."""
    folder = Path(folder).expanduser().absolute()
    pipe, log = folder / "mps" / "pipe", folder / "mps" / "log"
    if len(str(pipe)) > MAX_PIPE_DIR_LEN:
        tag = hashlib.sha1(str(folder).encode()).hexdigest()[:12]
        base = Path(tempfile.gettempdir()) / f"bsmps-{os.getuid()}-{tag}"
        pipe, log = base / "pipe", base / "log"
    for d in (pipe, log) if create else ():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    return Mps(str(pipe), str(log))


def _control_program() -> str:
    path = shutil.which(MPS_CONTROL)
    if path is None:
        raise MpsError(f"MPS: {MPS_CONTROL} is not on PATH (it comes with the NVIDIA driver; inside a container "
                       f"it needs the NVIDIA Container Toolkit's compute capability); run without MPS")
    return path


def mps_command(mps: Mps, *, need_gpus: bool = True) -> list[str]:
    """The command that runs ``mps``'s daemon in the foreground (``-f``), after checking it can run:
    the control program exists, a GPU is visible (``need_gpus``), and no daemon answers on these
    directories already (two daemons on one pipe directory would fight over its sockets)."""
    program = _control_program()
    if need_gpus and visible_gpus() == 0:
        raise MpsError("MPS: no NVIDIA GPU is visible (CUDA_VISIBLE_DEVICES / nvidia-smi -L); MPS shares a GPU "
                       "between processes and needs one")
    if mps.answers():
        raise MpsError(f"MPS: a daemon already answers on {mps.pipe_dir} (another stack or benchmark on this "
                       f"folder); stop it first (CUDA_MPS_PIPE_DIRECTORY={mps.pipe_dir} {MPS_CONTROL} <<< quit)")
    return [program, "-f"]


def prepare_mps(folder: str | Path, *, need_gpus: bool = True) -> tuple[Mps, list[str]]:
    """``folder``'s daemon directories and its command, the checks of :func:`mps_command` made before
    the directories are created (a refused start leaves nothing behind)."""
    cmd = mps_command(mps_for(folder, create=False), need_gpus=need_gpus)
    return mps_for(folder), cmd


def wait_mps_ready(mps: Mps, popen: subprocess.Popen, timeout_s: float = 20.0) -> float:
    """Wait until the daemon run by ``popen`` answers; the seconds waited. :class:`MpsError` with the
    end of its log if it exits first or does not answer within ``timeout_s``."""
    t0 = time.monotonic()
    while not mps.answers():
        if popen.poll() is not None:
            raise MpsError(f"MPS: {MPS_CONTROL} -f exited with code {popen.returncode} while starting "
                           f"(log {mps.control_log}):\n{mps.log_tail()}")
        if time.monotonic() - t0 > timeout_s:
            raise MpsError(f"MPS: the daemon did not answer within {timeout_s:.0f}s (log {mps.control_log}):\n"
                           f"{mps.log_tail()}")
        time.sleep(0.2)
    return time.monotonic() - t0


def stop_mps(mps: Mps, popen: subprocess.Popen, grace_s: float = 15.0) -> None:
    """``quit`` the daemon, then SIGTERM / SIGKILL its process group if it has not exited after ``grace_s``."""
    if popen.poll() is None:
        mps.quit()
    deadline = time.monotonic() + grace_s
    while popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if popen.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5.0)


@contextlib.contextmanager
def running_mps(folder: str | Path, *, timeout_s: float = 20.0, need_gpus: bool = True) -> Iterator[Mps]:
    """An MPS daemon of our own for the duration of the block: started in the foreground as a child in
    its own session, ``CUDA_MPS_*`` set in ``os.environ`` (so processes started inside the block are its
    clients), then quit and stopped, and the environment restored. :class:`MpsError` if it cannot start."""
    mps, cmd = prepare_mps(folder, need_gpus=need_gpus)
    with open(Path(mps.log_dir) / "daemon.out", "ab") as out:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, **mps.env()}, start_new_session=True)
    saved = {k: os.environ.get(k) for k in mps.env()}
    try:
        wait_mps_ready(mps, popen, timeout_s)
        os.environ.update(mps.env())
        yield mps
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_mps(mps, popen)
