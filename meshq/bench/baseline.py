"""The floor the produce figures are compared with: a raw pyzmq DEALER (this process) to ROUTER (a child).

Theory of operation
-------------------
On 127.0.0.1 the sender packs ``--batch`` values of ``--value-bytes`` random bytes into one
msgpack array per frame (packing is part of the measured loop: any producer must pack), sends
``[header, payload]`` where ``header`` is ``msgpack([seq, count])``, and keeps a window of
frames in flight. The receiver (``_baseline_router_main``, in a child process) unpacks only the
tiny header, counts records and answers a tiny ack per frame. It reports its count at the end,
so the baseline is checked too. A synchronous round trip (one record, wait for the ack) is also
timed: the floor for synchronous latency in Python + ZeroMQ. The run is short (~0.1 s), so it
is repeated more than meshq's (``BASELINE_REPEATS``) and the median is reported. It takes its
values, warm-up and phase timeout from produce.py, so the two compare.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import msgpack
import zmq

from meshq.bench.cpu import _CpuSampler
from meshq.bench.errors import BenchError
from meshq.bench.procs import READY_TIMEOUT_S, _Child
from meshq.bench.produce import PHASE_TIMEOUT_S, SYNC_WARMUP, _check_deadline, _values
from meshq.bench.stats import _percentiles_us, _summarize_runs

BASELINE_WINDOW = 16  # frames in flight in the raw pyzmq baseline
BASELINE_REPEATS = 5  # the baseline run is short (~0.1 s), so it is repeated more


def _baseline_router_main() -> None:
    """Run in a child process: a raw ROUTER that counts records and acks every frame."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 10_000)
    router.setsockopt(zmq.RCVHWM, 10_000)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"event": "ready", "port": port}), flush=True)
    records = frames = 0
    unpackb, packb = msgpack.unpackb, msgpack.packb
    try:
        while True:
            if not router.poll(int(PHASE_TIMEOUT_S * 1000) * 3):
                break  # the parent is gone: do not linger
            parts = router.recv_multipart()
            seq, count = unpackb(parts[1])
            if count < 0:  # end of run: report the totals and exit
                router.send_multipart([parts[0], packb([seq, records, frames])])
                break
            records += count
            frames += 1
            router.send_multipart([parts[0], packb(seq)])
    finally:
        router.close(0)
        context.term()


def _run_baseline(records: int, batch: int, value_bytes: int, sync_records: int, workdir: str) -> dict[str, Any]:
    child = _Child([sys.executable, "-c", "from meshq.bench.baseline import _baseline_router_main as m; m()"],
                   os.path.join(workdir, "baseline.stderr"))
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 10_000)
    dealer.setsockopt(zmq.RCVHWM, 10_000)
    dealer.setsockopt(zmq.RCVTIMEO, int(PHASE_TIMEOUT_S * 1000))
    try:
        port = child.wait_event("ready", READY_TIMEOUT_S)["port"]
        dealer.connect(f"tcp://127.0.0.1:{port}")
        values = _values(batch, value_bytes)
        packb = msgpack.packb
        send, recv = dealer.send_multipart, dealer.recv_multipart
        # warm-up: connect and a few frames
        for seq in range(5):
            send([packb([seq, batch]), packb(values)])
            recv()
        counted_here = 5 * batch

        sampler = _CpuSampler({"producer": os.getpid(), "receiver": child.pid})
        runs = []
        for _ in range(BASELINE_REPEATS):
            seq = 0
            sent = 0
            in_flight = 0
            sampler.start()
            start = time.perf_counter()
            while sent < records:
                n = min(batch, records - sent)
                send([packb([seq, n]), packb(values if n == batch else values[:n])])
                sent += n
                seq += 1
                in_flight += 1
                if in_flight >= BASELINE_WINDOW:
                    recv()
                    in_flight -= 1
                    if seq & 63 == 0:
                        _check_deadline(start, "the baseline")
            while in_flight:
                recv()
                in_flight -= 1
            elapsed = time.perf_counter() - start
            sampler.stop()
            counted_here += records
            runs.append({"records": records, "seconds": elapsed, "records_per_s": records / elapsed})

        # synchronous round trips: one record per frame, wait for each ack
        one = values[:1]
        sync_warm = min(SYNC_WARMUP, sync_records)
        for i in range(sync_warm):
            send([packb([i, 1]), packb(one)])
            recv()
        samples: list[int] = []
        clock = time.perf_counter_ns
        for i in range(sync_records):
            t0 = clock()
            send([packb([i, 1]), packb(one)])
            recv()
            samples.append(clock() - t0)
        counted_here += sync_warm + sync_records

        send([packb([0, -1])])
        _seq, counted, _frames = msgpack.unpackb(recv()[0])
        if counted != counted_here:
            raise BenchError(f"baseline receiver counted {counted} records, expected {counted_here}")
        result = _summarize_runs(runs, value_bytes)
        result.update({"window_frames": BASELINE_WINDOW, "verified": True, "cpu": sampler.summary()})
        if samples:
            result["sync"] = _percentiles_us(samples)
        return result
    finally:
        dealer.close(0)
        context.term()
        child.stop()
