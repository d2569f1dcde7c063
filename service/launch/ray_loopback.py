"""``python -m service.launch.ray_loopback start --address=127.0.0.1:PORT ...``: ``ray start`` for one more node
of the embedded (loopback-only) cluster on this machine (:func:`service.launch.ray_cluster.start_ray_worker`).

The head runs with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch that makes its node IP the
loopback address, so that GCS, raylet and agents listen on 127.0.0.1 only (service/launch/ray_cluster.py). The same
switch makes ``ray start --address=...`` refuse to join ("multi-node clusters are not supported"),
while without it ``ray start`` rewrites ``127.0.0.1`` to the machine's address and cannot reach the
loopback-only GCS. Here the switch stays off for everything this node starts (its environment), and
in this process only the join check sees it on, with the node-IP lookup kept on loopback.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # raylet, agents, workers: loopback node IP
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main as ray_main

    def loopback_node_ip(address: str | None = None) -> str:  # services.get_node_ip_address, switch off
        import ray

        node = ray._private.worker._global_node
        return node.node_ip_address if node is not None else services.get_localhost_ip()

    services.get_node_ip_address = loopback_node_ip
    ray_constants.ENABLE_RAY_CLUSTER = True  # read only by `ray start`'s join check now
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
