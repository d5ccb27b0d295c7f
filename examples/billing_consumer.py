"""Consume orders as the consumer group "billing", committing as it goes; a restart resumes.

    python examples/billing_consumer.py --seed 127.0.0.1:7450 --idle 3
"""

from __future__ import annotations

import json
from collections import Counter

from _connect import connection_args, node_options

import meshq


def main() -> None:
    parser = connection_args("sum order amounts per customer")
    parser.add_argument("--topic", default="orders")
    parser.add_argument("--group", default="billing")
    parser.add_argument("--idle", type=float, default=3.0, help="stop after this many seconds without a record")
    args = parser.parse_args()
    totals: Counter[str] = Counter()
    seen = 0
    with meshq.Node(role="client", **node_options(args)) as node:
        node.wait_ready(timeout=10)
        with node.consumer(args.topic, group=args.group, start="earliest") as consumer:
            while True:
                records = consumer.poll(timeout=args.idle, max_records=500)
                if not records:
                    break
                for record in records:
                    event = json.loads(record.value)
                    totals[event["customer"]] += event["amount"]
                seen += len(records)
                consumer.commit()
    print(f"{seen} new orders; top customers: {totals.most_common(3)}")


if __name__ == "__main__":
    main()
