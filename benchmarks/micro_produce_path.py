"""Cost of each step of the produce path for one batch, measured in isolation (µs per batch).

Explains where the time of ``meshq bench produce`` goes; run it beside py-spy profiles.
Every step calls the real meshq function with the benchmark's shape (``--batch`` records
of ``--value-bytes`` random bytes). Loopback only; a temporary log directory is removed.

    python benchmarks/micro_produce_path.py [--batch 1000] [--value-bytes 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import timeit
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.log.segmented import SegmentedLog


def per_call_us(fn: Callable[[], Any], min_time_s: float = 0.3) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(number, 1)
    best = min(timer.repeat(repeat=5, number=number))
    while best * 5 < min_time_s and number < 1_000_000:
        number *= 2
        best = min(timer.repeat(repeat=5, number=number))
    return best / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args()
    n = args.batch
    values = [os.urandom(args.value_bytes) for _ in range(n)]
    now_ms = int(time.time() * 1000)
    rows: list[tuple[str, str, float]] = []

    def add(side: str, name: str, fn: Callable[[], Any]) -> None:
        rows.append((side, name, per_call_us(fn)))

    # ---------------- baseline
    add("baseline", "msgpack.packb(list of values)", lambda: msgpack.packb(values))

    # ---------------- client side
    records = [(None, v, None, now_ms) for v in values]
    add("client", "produce_batch: build (key, value, headers, ts) tuples",
        lambda: [(None, v, None, now_ms) for v in values])

    def size_loop() -> int:  # NodeCore._enqueue_records: per-record size accounting
        size = 0
        for record in records:
            size += len(record[1]) + (len(record[0]) if record[0] else 0) + 16
        return size

    add("client", "_enqueue_records: per-record size loop", size_loop)
    add("client", "_enqueue_records: all(key is None) check", lambda: all(r[0] is None for r in records))
    add("client", "encode_batch (tuples + packb + crc)",
        lambda: batch_format.encode_batch(records, producer_id=1, producer_epoch=0, base_sequence=0))
    packed = [(r[3] - now_ms, r[0], r[1], r[2]) for r in records]
    add("client", "  of which msgpack.packb of 4-tuples", lambda: msgpack.packb(packed, use_bin_type=True))
    data = batch_format.encode_batch(records, producer_id=1, producer_epoch=0, base_sequence=0)
    body = {"topic": "bench-topic", "partition": 3, "acks": "leader", "timeout_ms": 30000}
    add("client", "wire.encode produce header (schema check, __debug__ on)",
        lambda: wire.encode("default", "client-x", "produce", 7, body, (data,)))

    # ---------------- node side
    frames = wire.encode("default", "client-x", "produce", 7, body, (data,))
    add("node", "wire.decode produce (header unpack + schema checks)", lambda: wire.decode(frames, "default"))
    add("node", "verify_batch (header + crc + full msgpack decode + per-record checks)",
        lambda: batch_format.verify_batch(data))
    header = batch_format.parse_header(data)
    add("node", "  of which crc_ok", lambda: batch_format.crc_ok(data, 0, header))
    add("node", "  of which _decode_body", lambda: batch_format._decode_body(data, 0, header))
    add("node", "stamp (bytearray copy + bytes copy)", lambda: batch_format.stamp(data, 123, 0))
    tmp = tempfile.mkdtemp(prefix="meshq-micro-")
    try:
        log = SegmentedLog(os.path.join(tmp, "p0"), "t", 0, segment_bytes=1 << 30)

        def append() -> None:
            log.append(batch_format.stamp(data, log.end_offset, 0), now_ms=now_ms)

        # a fixed number of appends (~100 MB, like one benchmark run): timeit's auto-ranging
        # would write gigabytes and measure the kernel's dirty-page throttling instead
        for _ in range(50):
            append()
        count = 1000
        start = time.perf_counter()
        for _ in range(count):
            append()
        rows.append(("node", f"stamp + SegmentedLog.append (check + write), mean of {count}",
                     (time.perf_counter() - start) / count * 1e6))
        log.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    reply = {"topic": "bench-topic", "partition": 3, "base_offset": 1000, "duplicate": False}
    add("node", "wire.encode produce_ok reply", lambda: wire.encode("default", "node-x", "produce_ok", 7, reply))

    # ---------------- sockets (tcp loopback, both ends in this process)
    context = zmq.Context()
    push = context.socket(zmq.DEALER)
    pull = context.socket(zmq.ROUTER)
    push.setsockopt(zmq.SNDHWM, 0)
    pull.setsockopt(zmq.RCVHWM, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        time.sleep(0.2)

        def send_recv(copy: bool) -> None:
            push.send(frames[0], zmq.SNDMORE)
            push.send(frames[1], 0, copy=copy)
            pull.recv_multipart()

        add("socket", f"send {len(data):,} B payload copy=True + recv_multipart", lambda: send_recv(True))
        add("socket", f"send {len(data):,} B payload copy=False + recv_multipart", lambda: send_recv(False))

        def recv_again() -> None:
            try:
                pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass

        add("socket", "recv_multipart(NOBLOCK) raising zmq.Again (empty queue)", recv_again)
    finally:
        push.close(0)
        pull.close(0)
        context.term()

    print(f"batch of {n} records x {args.value_bytes} B; encoded batch {len(data):,} B; µs per batch (best of 5)")
    for side, name, us in rows:
        print(f"{side:9s} {us:9.1f}  {name}")


if __name__ == "__main__":
    main()
