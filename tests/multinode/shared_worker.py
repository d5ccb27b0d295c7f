"""A shared-subscription worker process for tests/multinode/test_shared.py.

Jobs are values ``job-<i>``. The worker acks each job, except: ``i % 50 == 0`` it rejects
(``nack(requeue=False)``: dead letter ``rejected``); ``i % 97 == 0`` it never answers (dead
letter ``max_deliveries`` after three ack timeouts); ``i % 50 == 25`` it nacks on the first
delivery and acks the second. After each poll it waits for its answers to be confirmed and
writes ``confirmed <i>`` lines; a job whose confirmation failed is written ``unconfirmed <i>``.
It stops when the file ``--stop`` exists and a poll comes back empty.
"""

from __future__ import annotations

import argparse
import os
import sys

import meshq
from meshq.errors import MeshqError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--seed", action="append", default=[])
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop", required=True)
    args = parser.parse_args()
    with meshq.Node(cluster=args.cluster, role="client", seeds=args.seed, mdns=False) as node, \
            open(args.out, "a", buffering=1) as out:
        node.wait_ready(timeout=60)
        consumer = node.consumer(args.topic, group="workers", mode="shared", ack_timeout=5.0, max_deliveries=3,
                                 prefetch=200)
        print("ready", flush=True)
        while True:
            try:
                records = consumer.poll(timeout=0.5, max_records=200)
            except MeshqError as exc:
                out.write(f"error {exc}\n")
                continue
            if not records and os.path.exists(args.stop):
                break
            answered = []
            for record in records:
                i = int(record.value.split(b"-")[1])
                count = int(record.headers["meshq-delivery-count"])
                if i % 50 == 0:
                    consumer.nack(record, requeue=False)
                elif i % 97 == 0:
                    continue
                elif i % 50 == 25 and count == 1:
                    consumer.nack(record)
                else:
                    consumer.ack(record)
                    answered.append(i)
            try:
                consumer.flush_acks(timeout=15)
                out.writelines(f"confirmed {i}\n" for i in answered)
            except MeshqError as exc:
                out.writelines(f"unconfirmed {i}\n" for i in answered)
                out.write(f"error {exc}\n")
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
