"""Produce keyed order events; each customer's orders stay in order on one partition.

    meshq node --data ./data --port 7450 --no-mdns          # in another terminal
    python examples/produce_orders.py --seed 127.0.0.1:7450 --count 1000
"""

from __future__ import annotations

import json
import random
import time

from _connect import connection_args, node_options

import meshq


def main() -> None:
    parser = connection_args("produce order events")
    parser.add_argument("--topic", default="orders")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--acks", default="leader", choices=["none", "leader", "quorum", "all"])
    args = parser.parse_args()
    rng = random.Random(1)
    with meshq.Node(role="client", **node_options(args)) as node:
        node.wait_ready(timeout=10)
        started = time.monotonic()
        futures = []
        for number in range(args.count):
            customer = f"customer-{rng.randrange(50)}"
            event = {"order": number, "customer": customer, "amount": rng.randrange(1, 500)}
            futures.append(node.produce_async(args.topic, json.dumps(event).encode(), key=customer.encode(),
                                              acks=args.acks))
        node.flush(timeout=60)
        last = futures[-1].result()
        elapsed = time.monotonic() - started
        print(f"{args.count} orders acknowledged in {elapsed:.2f} s; last at partition {last.partition} "
              f"offset {last.offset}")


if __name__ == "__main__":
    main()
