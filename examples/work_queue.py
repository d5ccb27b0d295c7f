"""A work queue: one producer of jobs, N workers on any machines of the LAN, one failing on purpose.

    python examples/work_queue.py produce --seed 127.0.0.1:7450 --count 1000
    python examples/work_queue.py worker  --seed 127.0.0.1:7450 --name w1
    python examples/work_queue.py worker  --seed 127.0.0.1:7450 --name w2 --flaky   # fails 1 job in 5
    python examples/work_queue.py dead    --seed 127.0.0.1:7450                     # the dead letters

(or ``--interface IP`` instead of ``--seed`` to find the mesh with mDNS). Each job goes to one
worker of the shared group ``workers``; a worker acks a job once done. The flaky worker nacks
one job in five on its first try (another worker gets it at once, its ``meshq-delivery-count`` one higher); a
job named ``poison-...`` fails everywhere and lands in ``jobs.dlq`` after ``--max-deliveries``
tries. Jobs produced with ``--urgent-every K`` carry priority 9 and overtake the others.
"""

from __future__ import annotations

import json
import time
import zlib

from _connect import connection_args, node_options

import meshq


def produce(node: meshq.Node, args) -> None:
    futures = []
    for i in range(args.count):
        name = f"poison-{i}" if args.poison_every and i % args.poison_every == args.poison_every - 1 else f"job-{i}"
        urgent = bool(args.urgent_every) and i % args.urgent_every == 0
        futures.append(node.produce_async(args.topic, json.dumps({"job": name}).encode(),
                                          priority=9 if urgent else None))
    node.flush(timeout=60)
    for future in futures:
        future.result(0)
    print(f"{args.count} jobs queued on {args.topic}")


def work(node: meshq.Node, args) -> None:
    done = failed = 0
    with node.consumer(args.topic, group="workers", mode="shared", ack_timeout=args.ack_timeout,
                       max_deliveries=args.max_deliveries) as consumer:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < args.idle:
            records = consumer.poll(timeout=0.5, max_records=100)
            if records:
                idle_since = time.monotonic()
            for record in records:
                job = json.loads(record.value)["job"]
                attempt = int(record.headers["meshq-delivery-count"])
                if job.startswith("poison-") or (args.flaky and attempt == 1 and zlib.crc32(job.encode()) % 5 == 0):
                    consumer.nack(record)  # try again (elsewhere); dead-lettered after max_deliveries
                    failed += 1
                    continue
                consumer.ack(record)
                done += 1
        consumer.flush_acks()
    print(f"worker {args.name}: {done} jobs done, {failed} failed attempts")


def dead(node: meshq.Node, args) -> None:
    reasons: dict[str, int] = {}
    with node.consumer(f"{args.topic}.dlq") as consumer:
        while records := consumer.poll(timeout=args.idle, max_records=500):
            for record in records:
                reason = record.headers["meshq-dlq-reason"].decode()
                reasons[reason] = reasons.get(reason, 0) + 1
    print(f"{sum(reasons.values())} dead letters: {reasons}")


def main() -> None:
    parser = connection_args("a work queue on a shared subscription")
    parser.add_argument("role", choices=["produce", "worker", "dead"])
    parser.add_argument("--topic", default="jobs")
    parser.add_argument("--count", type=int, default=1000, help="produce: how many jobs")
    parser.add_argument("--poison-every", type=int, default=50, help="produce: every Nth job always fails (0: none)")
    parser.add_argument("--urgent-every", type=int, default=10, help="produce: every Nth job has priority 9")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--flaky", action="store_true", help="worker: fail one job in five (first tries) on purpose")
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    parser.add_argument("--max-deliveries", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0, help="stop after this many seconds without a job")
    args = parser.parse_args()
    with meshq.Node(role="client", **node_options(args)) as node:
        node.wait_ready(timeout=30)
        {"produce": produce, "worker": work, "dead": dead}[args.role](node, args)


if __name__ == "__main__":
    main()
