"""A service that embeds a storage node: it stores its own events and reads them back.

Run three of these on three machines (or three terminals) with the same --cluster; each
keeps its data in --data. On one machine, give each its own --data and --port:

    python examples/embedded_service.py --data ./svc1 --port 7461 --seed 127.0.0.1:7461
    python examples/embedded_service.py --data ./svc2 --port 7462 --seed 127.0.0.1:7461
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    with meshq.Node(cluster=args.cluster, data_dir=args.data, host=args.host, port=args.port, seeds=args.seed,
                    mdns=bool(args.interface), interfaces=args.interface) as node:
        print(f"node {node.node_id} at {node.address}")
        node.wait_ready(timeout=15)
        for number in range(args.events):
            md = node.produce("service-events", f"{node.node_id} event {number}".encode(), key=node.node_id.encode(),
                              acks="leader")
            print(f"stored at partition {md.partition} offset {md.offset}")
        consumer = node.consumer("service-events", start="earliest")
        mine = [r for r in consumer.poll(timeout=2.0, max_records=10_000) if r.key == node.node_id.encode()]
        print(f"read back {len(mine)} of my events; members: "
              f"{[m['node_id'] for m in node.status()['members'] if m['role'] == 'storage']}")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
