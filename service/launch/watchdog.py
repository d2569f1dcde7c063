"""A watchdog that stops a stack once the process that started it is gone (e.g. a killed pytest).

``spawn_watchdog(home)`` starts ``python -m service.launch.watchdog watch HOME PARENT_PID
PARENT_START_TIME`` detached (its own session); it polls the parent once a second and, when that
pid is gone or has another start time, runs :func:`service.launch.stack.stop_stack` for ``home``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from service.launch.processes import is_zombie, proc_start_time
from service.launch.stack import stop_stack


def spawn_watchdog(home: str | Path, parent_pid: int | None = None) -> subprocess.Popen:
    """A detached watchdog that stops ``home``'s stack once ``parent_pid`` (default: this process) is
    gone. Kill it (by its pid) after a normal :func:`~service.launch.stack.stop_stack`."""
    parent_pid = parent_pid or os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "service.launch.watchdog", "watch", str(Path(home).absolute()), str(parent_pid),
         str(proc_start_time(parent_pid) or 0)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def watch_parent(home: str, parent_pid: int, parent_start: int) -> None:
    """Block while the parent lives (same pid and start time, not a zombie); then stop the stack."""
    while proc_start_time(parent_pid) == parent_start and not is_zombie(parent_pid):
        time.sleep(1.0)
    stop_stack(home, remove_temp=True, quiet=True)


if __name__ == "__main__":  # python -m service.launch.watchdog watch HOME PID START
    if len(sys.argv) == 5 and sys.argv[1] == "watch":
        watch_parent(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        print("usage: python -m service.launch.watchdog watch HOME PARENT_PID PARENT_START_TIME", file=sys.stderr)
        sys.exit(2)
