"""The command of a GPU node in the compose deployment: ``ray start ... --block``, with an MPS daemon of
the node's own around it when asked.

    python -m service.launch.gpu_node [--mps] -- ray start --address=ray-head:6379 --block ...

With ``--mps`` (or ``BONN_SWEEP_MPS=1`` in the environment) the node starts an NVIDIA MPS control
daemon first (service/launch/gpu.py: private pipe and log directories under ``BONN_SWEEP_MPS_DIR``,
default ``/tmp/bonn-sweep-node``), runs the command with the MPS client settings in its environment
(so Ray's workers, the trials, share the GPU through MPS), forwards SIGTERM / SIGINT / SIGHUP to it,
and when it exits quits the daemon and exits with its code. If the daemon cannot start, one line says
why and the node exits with code 2 (the container's log shows it; nothing half-started stays).
Without MPS it only runs the command. The daemon runs as the node's user (root in the project image):
MPS inside one container needs no host IPC, since the daemon and its clients share the container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from service.launch.gpu import MpsError, env_flag, running_mps

DEFAULT_MPS_DIR = "/tmp/bonn-sweep-node"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_child(cmd: Sequence[str]) -> int:
    """Run ``cmd`` with this environment, forwarding the stop signals; its exit code (128 + n for a signal)."""
    child = subprocess.Popen(list(cmd))
    previous = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in FORWARDED}
    try:
        rc = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print("usage: python -m service.launch.gpu_node [--mps] -- COMMAND ...", file=sys.stderr)
        return 2
    split = args.index("--")
    opts, cmd = args[:split], args[split + 1 :]
    unknown = [o for o in opts if o != "--mps"]
    if unknown or not cmd:
        print(f"gpu_node: unknown option(s) {unknown}" if unknown else "gpu_node: no command after --", file=sys.stderr)
        return 2
    try:
        mps = "--mps" in opts or env_flag("BONN_SWEEP_MPS")
    except ValueError as exc:
        print(f"gpu_node: {exc}", file=sys.stderr)
        return 2
    if not mps:
        return run_child(cmd)
    folder = os.environ.get("BONN_SWEEP_MPS_DIR") or DEFAULT_MPS_DIR

    def stop_starting(sig: int, _frame) -> None:  # a stop while the daemon starts: clean up, then exit
        raise SystemExit(128 + sig)

    for sig in FORWARDED:
        signal.signal(sig, stop_starting)
    try:
        with running_mps(folder) as daemon:
            print(f"gpu_node: MPS daemon up (CUDA_MPS_PIPE_DIRECTORY={daemon.pipe_dir})", file=sys.stderr, flush=True)
            return run_child(cmd)
    except MpsError as exc:
        print(f"gpu_node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
