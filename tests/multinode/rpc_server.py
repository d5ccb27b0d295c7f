"""A serving process for the request/reply multi-process tests.

``python -m tests.multinode.rpc_server CLUSTER SEED LOG`` joins the cluster as a client node and
serves ``idem`` (idempotent) and ``once`` (not): each handler appends the request to LOG (one
line per run, written before the reply, so a run is on record even if the process is killed
right after) and echoes it. Prints one JSON ready line; runs until killed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import meshq


def main() -> None:
    cluster, seed, log_path = sys.argv[1:4]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def handler(service: str):
        def handle(payload: bytes) -> bytes:
            os.write(fd, service.encode() + b" " + payload + b"\n")
            time.sleep(0.01)
            return payload
        return handle

    with meshq.Node(cluster=cluster, seeds=[seed], mdns=False, role="client") as node:
        node.serve("idem", handler("idem"), concurrency=4, idempotent=True)
        node.serve("once", handler("once"), concurrency=4)
        print(json.dumps({"event": "ready", "node_id": node.node_id}), flush=True)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main()
