"""Which side of a one-at-a-time request costs what: the raw echo, the protocol's frames, the desk, the caller.

Starts, on 127.0.0.1, the serving child of ``meshq bench rpc`` (a storage node serving
``bench.echo`` from a desk) and its raw pyzmq ROUTER echo child, then in this process, round
after round, times one request at a time (median of ``--requests`` after 300 untimed):

* ``raw1``: a DEALER sending one 100-byte frame to the raw echo (the floor of ``meshq bench rpc``);
* ``raw2``: the same with a 60-byte second frame (the extra frame the wire's header adds);
* ``frames->desk``: a DEALER sending the real ``rpc_request`` frames (``wire.encode``) to the desk
  and reading its answer: the serving side's cost over the floor;
* ``meshq->desk``: ``node.request`` from a client node: the calling side's cost on top;
* ``last send``: inside ``node.request``, the time the send of its last frame takes (p50).

    python benchmarks/rpc_sides.py [--requests 3000] [--rounds 3]

Children are stopped by PID, the temporary directory removed, also on errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

import meshq
import meshq.io.rpc_direct as rpc_direct
from meshq.core import wire


def child(*code_args: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", *code_args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if not line:
        proc.kill()
        raise SystemExit("a child process did not start")
    return proc, json.loads(line)


def median_us(call, count: int) -> float:
    for _ in range(300):
        call()
    times = []
    for _ in range(count):
        started = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="meshq-rpc-sides-")
    procs: list[subprocess.Popen] = []
    context = zmq.Context()
    sent_last: list[int] = []
    raw_send = rpc_direct._raw_send

    def timed_send(sock, frame, flags, copy):  # (the last frame is the one sent without SNDMORE)
        started = time.perf_counter_ns()
        raw_send(sock, frame, flags, copy)
        if flags == rpc_direct._NOBLOCK:
            sent_last.append(time.perf_counter_ns() - started)

    try:
        server, ready = child("from meshq.bench.rpc import _serve_main; _serve_main()", "sides", f"{tmp}/s", "1")
        procs.append(server)
        raw, raw_ready = child("from meshq.bench.rpc import _raw_router_main; _raw_router_main()")
        procs.append(raw)
        with meshq.Node(cluster="sides", data_dir=f"{tmp}/c", mdns=False, role="client",
                        seeds=[ready["address"].removeprefix("tcp://")]) as node:
            deadline = time.monotonic() + 30
            while True:
                try:
                    node.request("bench.echo", b"x", timeout=2)
                    break
                except meshq.MeshqError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            server_id = next(iter(node.core.adverts.remote))
            desk = node.core.rpc.desk(server_id, "bench.echo")
            if desk is None:
                raise SystemExit("the serving node advertises no desk for bench.echo")
            to_desk = context.socket(zmq.DEALER)
            to_raw = context.socket(zmq.DEALER)
            for sock, endpoint in ((to_desk, desk), (to_raw, f"tcp://127.0.0.1:{raw_ready['port']}")):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, 5000)
                sock.connect(endpoint)
            payload, header = b"x" * 100, b"h" * 60
            request_id = [1 << 50]

            def frames_to_desk() -> None:
                request_id[0] += 1
                to_desk.send_multipart(wire.encode("sides", "raw-client", "rpc_request", request_id[0],
                                                   {"service": "bench.echo", "incarnation": 1, "timeout_ms": 5000},
                                                   (payload,)))
                to_desk.recv_multipart()

            rpc_direct._raw_send = timed_send
            for round_ in range(1, args.rounds + 1):
                sent_last.clear()
                figures = {
                    "raw1": median_us(lambda: (to_raw.send(payload), to_raw.recv_multipart()), args.requests),
                    "raw2": median_us(lambda: (to_raw.send_multipart([header, payload]), to_raw.recv_multipart()),
                                      args.requests),
                    "frames->desk": median_us(frames_to_desk, args.requests),
                    "meshq->desk": median_us(lambda: node.request("bench.echo", payload, timeout=5), args.requests),
                }
                figures["last send"] = statistics.median(sent_last) / 1000
                print(f"round {round_}: " + "  ".join(f"{name} {value:.1f} µs" for name, value in figures.items()),
                      flush=True)
            to_desk.close(0)
            to_raw.close(0)
    finally:
        rpc_direct._raw_send = raw_send
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        context.term()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
