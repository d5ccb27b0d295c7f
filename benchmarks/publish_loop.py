"""The publishing thread's own rate: ``node.publish`` in a loop to one subscriber in another process.

Starts a storage node here and, as a child process, the subscriber of ``meshq bench pubsub``
(a client node subscribed to ``bench.pubsub.data``); once the interest has arrived, publishes
``--messages`` 100-byte messages ``--rounds`` times and prints, per round, the loop's rate and the
publishing thread's CPU per message (``RUSAGE_THREAD``). Used in docs/performance.md ("The publisher
and the runtime thread no longer take turns"); profile it with ``py-spy record -- python
benchmarks/publish_loop.py``.

    python benchmarks/publish_loop.py [--messages 300000] [--rounds 5]

The child is stopped by PID and the temporary directory removed, also on errors.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import meshq

SUBJECT = "bench.pubsub.data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="meshq-publish-loop-")
    child = None
    try:
        with meshq.Node(cluster="bench-pubsub", data_dir=f"{tmp}/pub", mdns=False, replication_factor=1) as node:
            seed = node.address.removeprefix("tcp://")
            child = subprocess.Popen([sys.executable, "-c", "from meshq.bench.pubsub import worker_meshq_sub; "
                                      f"worker_meshq_sub({seed!r}, {args.messages * args.rounds})"],
                                     stdout=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while len(node.core.pubsub.route(SUBJECT).remote) < 1:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise SystemExit("the subscriber's interest never arrived")
                time.sleep(0.01)
            data = b"x" * 100
            publish = node.publish
            for round_ in range(1, args.rounds + 1):
                before = resource.getrusage(resource.RUSAGE_THREAD)
                started = time.perf_counter()
                for _ in range(args.messages):
                    publish(SUBJECT, data)
                took = time.perf_counter() - started
                after = resource.getrusage(resource.RUSAGE_THREAD)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                print(f"round {round_}: {args.messages / took:,.0f} msg/s, publishing thread "
                      f"{cpu / args.messages * 1e6:.2f} µs CPU per message", flush=True)
    finally:
        if child is not None:
            child.kill()
            child.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
