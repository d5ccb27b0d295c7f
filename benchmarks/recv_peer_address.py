"""What it costs the runtime to know who sent each message (``invalid_frames`` by peer).

The runtime reads the first frame of every message as a ``zmq.Frame`` (``recv(copy=False)``),
because only a Frame carries libzmq's ``Peer-Address`` (the sender's IP address, read only
when the message turns out invalid), then takes its bytes; before, it read bytes directly
(``recv()``). This measures both ways of reading 100-byte messages from an inproc PAIR,
alternating, median of ``--rounds`` rounds with min/max, wall and CPU time (rusage).

    python benchmarks/recv_peer_address.py [--messages 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import zmq


def one_round(as_frame: bool, messages: int) -> tuple[float, float]:
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        a.setsockopt(zmq.SNDHWM, 0)
        b.setsockopt(zmq.RCVHWM, 0)
        a.bind("inproc://recv-bench")
        b.connect("inproc://recv-bench")
        payload = b"x" * 100
        for _ in range(messages):
            a.send(payload)
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        if as_frame:
            for _ in range(messages):
                _ = b.recv(zmq.NOBLOCK, copy=False).bytes
        else:
            for _ in range(messages):
                b.recv(zmq.NOBLOCK)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    finally:
        a.close(0)
        b.close(0)
        context.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for as_frame in (False, True):
            results[as_frame].append(one_round(as_frame, args.messages))
    base_wall = statistics.median(w for w, _ in results[False])
    base_cpu = statistics.median(c for _, c in results[False])
    for as_frame, label in ((False, "recv() -> bytes (before)"), (True, "recv(copy=False).bytes (now)")):
        walls = [w for w, _ in results[as_frame]]
        cpus = [c for _, c in results[as_frame]]
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(f"{label:32s} wall {wall / args.messages * 1e6:.2f} µs/msg (min {min(walls) / args.messages * 1e6:.2f}, "
              f"max {max(walls) / args.messages * 1e6:.2f}), cpu {cpu / args.messages * 1e6:.2f} µs/msg; "
              f"ratio to before: wall {wall / base_wall:.2f}, cpu {cpu / base_cpu:.2f}")


if __name__ == "__main__":
    main()
