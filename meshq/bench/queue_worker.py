"""One worker process of ``meshq bench queue``: a shared-subscription member that acks every record.

It prints JSON lines on stdout: ``{"event": "ready"}`` once its consumer exists, then waits
for ``go`` on stdin, acks every record it gets until ``stop`` arrives, waits for its acks to
be confirmed and prints ``{"event": "done", "acked": N}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import meshq


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--seed", action="append", default=[])
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    args = parser.parse_args()
    go, stop = threading.Event(), threading.Event()

    def read_commands() -> None:
        for line in sys.stdin:
            (go if line.strip() == "go" else stop).set()
        stop.set()

    threading.Thread(target=read_commands, daemon=True).start()
    acked = 0
    with meshq.Node(cluster=args.cluster, role="client", seeds=args.seed, mdns=False) as node:
        node.wait_ready(timeout=60)
        consumer = node.consumer(args.topic, group=args.group, mode="shared", ack_timeout=60.0, prefetch=2000)
        print(json.dumps({"event": "ready"}), flush=True)
        go.wait()
        while not stop.is_set():
            for record in consumer.poll(timeout=0.2, max_records=1000):
                consumer.ack(record)
                acked += 1
        consumer.close(timeout=30)
    print(json.dumps({"event": "done", "acked": acked}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
