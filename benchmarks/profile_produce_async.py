"""Where ``produce_async``'s per-record time goes in the caller's thread (cProfile).

Starts an in-process storage node (127.0.0.1, mDNS off, a temporary data directory that is
removed afterwards), produces ``N`` 100-byte records with ``produce_async`` from one thread in a
tight loop, ``flush()``es, prints the rate and the process CPU per record, then repeats the loop
under cProfile and prints the top functions by own time. cProfile sees only the calling
thread (the runtime thread of the same process competes for the GIL, so the rate is lower than
``meshq bench replication``'s, where the node is another process).

    python benchmarks/profile_produce_async.py 100000
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time

from meshq.node import Node


def main(count: int) -> None:
    data_dir = tempfile.mkdtemp(prefix="meshq-prof-")
    node = Node(cluster=f"prof-{os.getpid()}", data_dir=data_dir, mdns=False, replication_factor=1)
    try:
        node.start()
        node.wait_ready(timeout=20)
        node.create_topic("t", partitions=8, replication_factor=1)
        values = [os.urandom(100) for _ in range(1000)]
        for value in values[:200]:
            node.produce_async("t", value, acks="leader")
        node.flush(30)

        def loop() -> list:
            futures: list = []
            append = futures.append
            produce_async = node.produce_async
            for i in range(count):
                append(produce_async("t", values[i % 1000], acks="leader"))
            node.flush(60)
            return futures

        start, cpu0 = time.perf_counter(), time.process_time()
        futures = loop()
        elapsed = time.perf_counter() - start
        failed = [f for f in futures if f.exception(0) is not None]
        print(f"{count / elapsed:,.0f} records/s, process CPU {(time.process_time() - cpu0) / count * 1e6:.2f} "
              f"µs per record, {len(failed)} failed")
        profile = cProfile.Profile()
        profile.enable()
        loop()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    finally:
        node.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
