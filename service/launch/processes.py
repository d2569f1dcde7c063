"""Process supervision for the embedded stack: spawn a server in its own session, tell it apart from
a reused pid, wait until it answers, and stop exactly it (and what it started).

A process is identified by its pid *and* its start time (clock ticks since boot, from ``/proc``), so
that a stale record (after a reboot, or a pid reused by a stranger) never leads to signalling someone
else's process. Each server runs as the leader of its own process group (``start_new_session=True``);
:func:`stop_proc` signals the leader, then its group, then SIGKILLs what is left of the group and of
the leader's descendants -- each pid checked against the start time recorded before the first signal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class StackError(RuntimeError):
    """The embedded stack (or one of its processes) could not start: the message says which and why."""


# -- reading /proc --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/{pid}/stat`` after the command name (field 3, the state, first)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) from /proc: with the pid, identifies a process uniquely."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def proc_pgid(pid: int) -> int | None:
    """The process group of ``pid`` (None if it is gone)."""
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def is_zombie(pid: int) -> bool:
    """True for a zombie, and for a pid that is gone."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def _all_ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            fields = _stat_fields(int(d.name))
            if fields is not None:
                out[int(d.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` in the process tree (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for p, pp in _all_ppids().items():
        children.setdefault(pp, []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def group_members(pgid: int) -> set[int]:
    """Every living process in process group ``pgid``."""
    return {int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and proc_pgid(int(d.name)) == pgid}


def reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child and has exited (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# -- one supervised process -----------------------------------------------------------------------


@dataclass
class Proc:
    """A process the stack started, as recorded in ``stack.json``."""

    name: str
    pid: int
    pgid: int
    start_time: int | None
    log: str
    cmd: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        """Still the process we started (same pid and start time) and not a zombie."""
        st = proc_start_time(self.pid)
        if st is None or st != self.start_time:
            return False
        return not is_zombie(self.pid)


def spawn(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> tuple[Proc, subprocess.Popen]:
    """Start ``cmd`` in a new session (its own process group), stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,
        )
    return Proc(name, popen.pid, popen.pid, proc_start_time(popen.pid), str(log), cmd), popen


def log_tail(path: str | Path, n: int = 25) -> str:
    """The last ``n`` lines of a log (for error messages)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


# -- health ---------------------------------------------------------------------------------------


def http_ok(url: str) -> Callable[[], bool]:
    """A health check: ``GET url`` answers 200."""

    def check() -> bool:
        r = httpx.get(url, timeout=2.0)
        return r.status_code == 200

    return check


def wait_healthy(name: str, check: Callable[[], bool], proc: Proc, popen: subprocess.Popen | None, timeout_s: float) -> float:
    """Poll ``check`` until it is true; returns the seconds waited. Raises :class:`StackError` with the
    tail of the process's log if it exits first or ``timeout_s`` passes."""
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if popen is not None and popen.poll() is not None:
            raise StackError(f"{name} exited with code {popen.returncode} while starting; log {proc.log}:\n{log_tail(proc.log)}")
        if time.monotonic() - t0 > timeout_s:
            raise StackError(f"{name} not healthy after {timeout_s:.0f}s; log {proc.log}:\n{log_tail(proc.log)}")
        time.sleep(0.25)


# -- stopping -------------------------------------------------------------------------------------


def _snapshot(proc: Proc) -> dict[int, int | None]:
    """Start time of the leader, its descendants and its group members, to tell them from reused pids."""
    return {p: proc_start_time(p) for p in {proc.pid} | descendants(proc.pid) | group_members(proc.pgid)}


def _wait_reaped(proc: Proc) -> None:
    """Up to 5 s for the leader to be gone (reaped, a zombie, or its pid reused)."""
    for _ in range(50):
        reap(proc.pid)
        if proc_start_time(proc.pid) != proc.start_time or is_zombie(proc.pid):
            break
        time.sleep(0.1)


def kill_now(proc: Proc) -> None:
    """SIGKILL at once to ``proc``'s group and every descendant (simulates losing the machine)."""
    targets = _snapshot(proc)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pgid, signal.SIGKILL)
    for p, st in targets.items():
        if st is not None and proc_start_time(p) == st:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
    _wait_reaped(proc)


def stop_proc(proc: Proc, *, grace_s: float, say: Callable[[str], None] = lambda _m: None) -> None:
    """SIGTERM the leader, then its group; SIGKILL what is left of the group and of the leader's
    descendants after ``grace_s``. Every pid is checked against its recorded start time, and the
    group is signalled only while one of its recorded members lives (so the pgid is still ours)."""
    targets = _snapshot(proc)

    def ours(p: int) -> bool:
        st = targets.get(p)
        return st is not None and proc_start_time(p) == st and not is_zombie(p)

    def signal_group(sig: int) -> None:
        if any(ours(p) for p in group_members(proc.pgid)):
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
        reap(proc.pid)
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


def executable(name: str) -> str:
    """``name`` next to this Python (the venv's ``ray``, ``mlflow``), else on PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)
