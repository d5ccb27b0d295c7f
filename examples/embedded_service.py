"""A service that embeds a storage node: it stores its own events, reads them back, and keeps
running as a member of the mesh until Ctrl-C (or --run-for S), so that the others can rely on it.

Run three of these on three machines (or three terminals) with the same --cluster; each
keeps its data in --data. On one machine, give each its own --data and --port:

    python examples/embedded_service.py --data ./svc1 --port 7461 --seed 127.0.0.1:7461
    python examples/embedded_service.py --data ./svc2 --port 7462 --seed 127.0.0.1:7461
    python examples/embedded_service.py --data ./svc3 --port 7463 --seed 127.0.0.1:7461

Each instance stays up: a storage member that exits a second after starting would leave the
partitions it leads without a leader until it comes back, and the others' writes to them
would fail (NotEnoughReplicasError). Stop an instance with Ctrl-C; start it again on the
same --data and it picks up where it was.
"""

from __future__ import annotations

import argparse
import signal
import time

import meshq


def main() -> None:
    parser = argparse.ArgumentParser(description="a service embedding a meshq storage node")
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--data", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", action="append", default=[])
    parser.add_argument("--interface", action="append", default=None, help="mDNS interface address (repeatable)")
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--run-for", type=float, default=None, metavar="S",
                        help="stop after S seconds (default: run until Ctrl-C or SIGTERM)")
    args = parser.parse_args()
    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    with meshq.Node(cluster=args.cluster, data_dir=args.data, host=args.host, port=args.port, seeds=args.seed,
                    mdns=bool(args.interface), interfaces=args.interface) as node:
        print(f"node {node.node_id} at {node.address}", flush=True)
        node.wait_ready(timeout=15)
        for number in range(args.events):
            md = node.produce("service-events", f"{node.node_id} event {number}".encode(), key=node.node_id.encode(),
                              acks="leader", timeout=15)
            print(f"stored at partition {md.partition} offset {md.offset}", flush=True)
        consumer = node.consumer("service-events", start="earliest")
        mine: list = []
        deadline = time.monotonic() + 10.0
        while len(mine) < args.events and time.monotonic() < deadline:
            mine += [r for r in consumer.poll(timeout=1.0, max_records=10_000) if r.key == node.node_id.encode()]
        consumer.close()
        print(f"read back {len(mine)} of my events; members: "
              f"{[m['node_id'] for m in node.status()['members'] if m['role'] == 'storage']}", flush=True)
        print("serving as a storage member of the mesh; Ctrl-C stops", flush=True)
        until = None if args.run_for is None else time.monotonic() + args.run_for
        try:
            while not stop["requested"] and (until is None or time.monotonic() < until):
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
