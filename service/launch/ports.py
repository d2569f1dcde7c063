"""Free TCP ports on 127.0.0.1 for the servers of the embedded stack (and Ray's worker port ranges)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable

from service.launch.processes import StackError

#: how many ports each Ray node gets for its workers (``--min-worker-port`` .. ``--max-worker-port``)
WORKER_PORT_RANGE = 100


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing is bound to ``host:port`` and nothing answers there."""
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


class PortPicker:
    """Hands out distinct ports: a usual default when asked for and free, else a free one."""

    def __init__(self, used: Iterable[int] = (), prefer_defaults: bool = False) -> None:
        self.used = set(used)
        self.prefer_defaults = prefer_defaults

    def pick(self, default: int | None = None) -> int:
        if self.prefer_defaults and default and default not in self.used and port_is_free(default):
            self.used.add(default)
            return default
        p = free_port(self.used)
        self.used.add(p)
        return p
