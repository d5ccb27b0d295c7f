"""A bare producer for profiling: one produce mode against a running node, nothing else.

Used by ``profile_produce.sh`` (wrapped in ``py-spy record``) so the client-side profile
holds only the phase being studied. Not the benchmark itself: use ``meshq bench produce``.

    python benchmarks/produce_client.py --seed 127.0.0.1:7450 --mode batch --records 3000000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections import deque

from meshq.node import Node


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", required=True)
    parser.add_argument("--mode", choices=["batch", "async", "sync"], default="batch")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--acks", default="leader")
    args = parser.parse_args()
    values = [os.urandom(args.value_bytes) for _ in range(args.batch)]
    topic = f"profile-{uuid.uuid4().hex[:8]}"
    client = Node(seeds=[args.seed], mdns=False, role="client").start()
    try:
        client.wait_ready(10)
        client.create_topic(topic, partitions=8, replication_factor=1, retention_ms=None)
        client.produce_batch(topic, values, acks=args.acks).result(30)
        start = time.perf_counter()
        if args.mode == "batch":
            window: deque = deque()
            sent = 0
            while sent < args.records:
                window.append(client.produce_batch(topic, values, acks=args.acks))
                sent += len(values)
                if len(window) >= args.window:
                    window.popleft().result(60)
            while window:
                window.popleft().result(60)
        elif args.mode == "async":
            n = len(values)
            for i in range(args.records):
                client.produce_async(topic, values[i % n], acks=args.acks)
            client.flush(60)
        else:
            n = len(values)
            for i in range(args.records):
                client.produce(topic, values[i % n], acks=args.acks)
        elapsed = time.perf_counter() - start
        print(f"{args.mode}: {args.records:,} records in {elapsed:.3f} s = {args.records / elapsed:,.0f} records/s "
              f"({elapsed / args.records * 1e6:.1f} µs/record)", file=sys.stderr)
    finally:
        client.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
