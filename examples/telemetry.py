"""Telemetry: sensors publish readings to ``sensors.<room>.<kind>``; a dashboard subscribes with wildcards.

    meshq node --data ./data --port 7450                      # somewhere on the LAN
    python examples/telemetry.py dashboard --seed 10.0.0.5:7450 --pattern 'sensors.>'
    python examples/telemetry.py sensor --seed 10.0.0.5:7450 --room kitchen --kind temp
    python examples/telemetry.py sensor --interface 10.0.0.8 --room hall --kind humidity

``--pattern 'sensors.*.temp'`` shows every room's temperature only, ``sensors.kitchen.>``
everything from the kitchen. The dashboard prints each reading, and a summary per subject
when it stops (``--seconds S`` or ``--count N``). Run several dashboards with ``--queue
NAME`` to share the readings between them instead (each reading to one of them).
"""

from __future__ import annotations

import random
import time

from _connect import connection_args, node_options

import meshq


def sensor(node: meshq.Node, args) -> None:
    subject = f"sensors.{args.room}.{args.kind}"
    deadline = time.monotonic() + args.wait_for_dashboard
    while not node.core.pubsub.route(subject).remote and time.monotonic() < deadline:
        time.sleep(0.05)  # nobody listens yet: publishing would cost nothing, and reach nobody
    rng = random.Random(args.room + args.kind)
    value = 20.0
    for _ in range(args.count):
        value += rng.uniform(-0.5, 0.5)
        node.publish(subject, f"{value:.2f}".encode(), headers={"unit": args.unit.encode()})
        time.sleep(args.interval)
    print(f"published {args.count} readings to {subject}")


def dashboard(node: meshq.Node, args) -> None:
    summary: dict[str, list[float]] = {}
    received = 0
    deadline = time.monotonic() + args.seconds
    with node.subscribe(args.pattern, queue=args.queue) as readings:
        print(f"dashboard listening on {args.pattern}", flush=True)
        while time.monotonic() < deadline and (args.count is None or received < args.count):
            try:
                reading = readings.recv(timeout=max(0.01, deadline - time.monotonic()))
            except meshq.TimeoutError:
                break
            received += 1
            unit = (reading.headers or {}).get("unit", b"").decode()
            print(f"{reading.subject} = {reading.data.decode()} {unit} (from {reading.source})", flush=True)
            summary.setdefault(reading.subject, []).append(float(reading.data))
    for subject in sorted(summary):
        values = summary[subject]
        print(f"{subject}: {len(values)} readings, last {values[-1]:.2f}, mean {sum(values) / len(values):.2f}")


def main() -> None:
    parser = connection_args("sensors and a dashboard on meshq pub/sub")
    parser.add_argument("role", choices=["sensor", "dashboard"])
    parser.add_argument("--room", default="kitchen")
    parser.add_argument("--kind", default="temp")
    parser.add_argument("--unit", default="C")
    parser.add_argument("--count", type=int, default=None, help="sensor: readings to send (default 10); "
                                                                 "dashboard: stop after N readings")
    parser.add_argument("--interval", type=float, default=0.2, help="sensor: seconds between readings")
    parser.add_argument("--wait-for-dashboard", type=float, default=10.0, metavar="S",
                        help="sensor: wait up to S seconds for a subscriber first")
    parser.add_argument("--pattern", default="sensors.>", help="dashboard: which subjects to show")
    parser.add_argument("--queue", default=None, help="dashboard: share the readings with other dashboards")
    parser.add_argument("--seconds", type=float, default=3600.0, help="dashboard: stop after S seconds")
    args = parser.parse_args()
    with meshq.Node(role="client", **node_options(args)) as node:
        node.wait_ready(timeout=10)
        if args.role == "sensor":
            if args.count is None:
                args.count = 10
            sensor(node, args)
        else:
            dashboard(node, args)


if __name__ == "__main__":
    main()
