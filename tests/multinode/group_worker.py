"""A consumer-group member in its own process, for ``test_groups.py``.

    python -m tests.multinode.group_worker --cluster NAME --seed HOST:PORT --topic T --group G

Prints one JSON line per event on stdout: ``{"ready": member_id}`` once it joined,
``{"assignment": [...]}`` whenever its partitions change, ``{"records": [[partition,
offset, value], ...]}`` for every poll that returned records. Runs until killed or its
stdin closes (then it closes the consumer: commit and leave).
"""

from __future__ import annotations

import argparse
import json
import select
import sys

import meshq


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    args = parser.parse_args()

    def say(**fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    with meshq.Node(cluster=args.cluster, role="client", seeds=[args.seed], mdns=False) as node:
        node.wait_ready(timeout=30)
        consumer = node.consumer(args.topic, group=args.group, auto_commit_interval_s=0.5)
        say(ready=consumer.member_id)
        assignment: list[int] | None = None
        while True:
            records = consumer.poll(timeout=0.2, max_records=1000)
            if consumer.assignment() != assignment:
                assignment = consumer.assignment()
                say(assignment=assignment)
            if records:
                say(records=[[r.partition, r.offset, r.value.decode()] for r in records])
            if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
                consumer.close()
                say(closed=True)
                return


if __name__ == "__main__":
    main()
