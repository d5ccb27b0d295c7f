"""The latency floor of a synchronous quorum write on this machine, with raw pyzmq and no meshq.

A synchronous ``acks=quorum`` produce with replication factor 3 is, at best: the client
sends the batch to the leader; the leader forwards it to both followers; the first
follower's answer completes the quorum; the leader answers the client. This script runs
exactly that message pattern with bare pyzmq sockets — four processes on 127.0.0.1 (client,
leader, two followers), DEALER to ROUTER as meshq uses them, no encoding, no log, no fsync —
and prints the round trip's percentiles next to a one-hop request/reply. Whatever meshq
adds comes on top of this.

With ``--work`` every hop also does the least that any replicated, checksummed log has to
do, with meshq's own batch format and nothing else: the client encodes a one-record batch
(``encode_batch``: msgpack body + CRC32) under a msgpack header; the leader decodes the
header, verifies the batch (CRC, record types), checks the producer sequence, stamps the
offset, ``write``s it to a file and sends one msgpack-headed copy to each follower; each
follower decodes, verifies, ``write``s and answers with a msgpack header; the leader
decodes the first answer, advances a high watermark and answers the client, which decodes
the answer. No threads besides the ones pyzmq starts: the client sends from the calling
thread, each server handles messages in its main thread. This is the floor of a
synchronous quorum write in Python on this machine.

    python benchmarks/relay_floor.py [--count 5000] [--bytes 100] [--work]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

import msgpack
import zmq

from meshq.core import batch as batch_format


def _router(port: int) -> zmq.Socket:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    return router


def _leader_sockets(port: int, follower_ports: list[int]) -> tuple[zmq.Socket, list[zmq.Socket], zmq.Poller]:
    """The leader's ROUTER (clients), a DEALER per follower, and a poller over all of them."""
    router = _router(port)
    followers = []
    for follower_port in follower_ports:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{follower_port}")
        followers.append(dealer)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    for dealer in followers:
        poller.register(dealer, zmq.POLLIN)
    return router, followers, poller


def _follower(port: int) -> None:
    router = _router(port)
    while True:
        route, body = router.recv_multipart()
        if body == b"stop":
            return
        router.send_multipart([route, body[:8]])  # the request id: "I have it"


def _leader(port: int, follower_ports: list[int]) -> None:
    router, followers, poller = _leader_sockets(port, follower_ports)
    pending: dict[bytes, bytes] = {}  # request id -> client route, until the first follower answers
    while True:
        for sock, _event in poller.poll():
            if sock is router:
                route, body = router.recv_multipart()
                if body == b"stop":
                    for dealer in followers:
                        dealer.send(b"stop")
                    return
                pending[body[:8]] = route
                for dealer in followers:
                    dealer.send(body)
            else:
                request_id = sock.recv()
                route = pending.pop(request_id, None)
                if route is not None:  # the first copy acknowledged: leader + 1 = a quorum of 3
                    router.send_multipart([route, b"ok"])


def _follower_work(port: int, path: str) -> None:
    router = _router(port)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    while True:
        frames = router.recv_multipart()
        if frames[1] == b"stop":
            os.close(fd)
            return
        _version, _cluster, _sender, _type, request_id, body = msgpack.unpackb(frames[1])
        header = batch_format.verify_batch(frames[2])
        os.write(fd, frames[2])
        reply = {"epoch": body["epoch"], "end": header.base_offset + header.record_count}
        router.send_multipart([frames[0], msgpack.packb([1, "floor", "f", "repl_ok", request_id, reply])])


def _leader_work(port: int, follower_ports: list[int], path: str) -> None:
    router, followers, poller = _leader_sockets(port, follower_ports)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sequences: dict[int, int] = {}
    pending: dict[int, tuple[bytes, int, int]] = {}  # end offset -> (client route, request id, base)
    end_offset = high_watermark = 0
    while True:
        for sock, _event in poller.poll():
            if sock is router:
                frames = router.recv_multipart()
                if frames[1] == b"stop":
                    for dealer in followers:
                        dealer.send(b"stop")
                    os.close(fd)
                    return
                _version, _cluster, _sender, _type, request_id, body = msgpack.unpackb(frames[1])
                header = batch_format.verify_batch(frames[2])
                if sequences.get(header.producer_id, header.base_sequence) != header.base_sequence:
                    raise SystemExit("out of order sequence")
                sequences[header.producer_id] = header.base_sequence + header.record_count
                stamped = batch_format.stamp(frames[2], end_offset, 1)
                os.write(fd, stamped)
                base, end_offset = end_offset, end_offset + header.record_count
                pending[end_offset] = (frames[0], request_id, base)
                repl = msgpack.packb([1, "floor", "l", "repl_append", end_offset,
                                      {"topic": body["topic"], "partition": body["partition"], "epoch": 1,
                                       "prev": base, "hw": high_watermark}])
                for dealer in followers:
                    dealer.send_multipart([repl, stamped])
            else:
                _version, _cluster, _sender, _type, _request_id, body = msgpack.unpackb(sock.recv())
                if body["end"] > high_watermark:  # leader + the first follower: a quorum of 3
                    high_watermark = body["end"]
                    waiting = pending.pop(high_watermark, None)
                    if waiting is not None:
                        route, request_id, base = waiting
                        router.send_multipart([route, msgpack.packb(
                            [1, "floor", "l", "produce_ok", request_id, {"base_offset": base}])])


def _percentiles(samples_us: list[float]) -> str:
    samples_us.sort()
    p50 = statistics.median(samples_us)
    p99 = samples_us[int(len(samples_us) * 0.99)]
    return f"p50 {p50:7.1f} µs   p99 {p99:7.1f} µs   ({len(samples_us):,} round trips)"


def _measure(port: int, count: int, payload: bytes) -> list[float]:
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    for i in range(200):  # warm up connections
        dealer.send((1 << 62 | i).to_bytes(8, "big") + payload)
        dealer.recv()
    samples = []
    for i in range(count):
        started = time.perf_counter()
        dealer.send(i.to_bytes(8, "big") + payload)
        dealer.recv()
        samples.append((time.perf_counter() - started) * 1e6)
    dealer.send(b"stop")
    dealer.close(linger=200)
    return samples


def _measure_work(port: int, count: int, payload: bytes) -> list[float]:
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    producer_id = 12345
    samples = []
    for i in range(200 + count):
        started = time.perf_counter()
        data = batch_format.encode_batch([(None, payload, None, int(time.time() * 1000))], producer_id=producer_id,
                                         producer_epoch=0, base_sequence=i)
        header = msgpack.packb([1, "floor", "c", "produce", i,
                                {"topic": "t", "partition": 0, "acks": "quorum", "timeout_ms": 30000}])
        dealer.send_multipart([header, data])
        reply = msgpack.unpackb(dealer.recv())
        if reply[5]["base_offset"] != i:
            raise SystemExit(f"answer {reply} to request {i}")
        if i >= 200:  # the first 200 warm up the connections
            samples.append((time.perf_counter() - started) * 1e6)
    dealer.send(b"stop")
    dealer.close(linger=200)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--bytes", type=int, default=100)
    parser.add_argument("--work", action="store_true",
                        help="also run the quorum pattern with the least work a replicated log must do (docstring)")
    args = parser.parse_args()
    payload = b"x" * args.bytes
    worked: list[float] = []
    with socket_ports(4) as ports:
        one_hop = multiprocessing.Process(target=_follower, args=(ports[0],), daemon=True)
        one_hop.start()
        hop = _measure(ports[0], args.count, payload)
        one_hop.join(5)
        followers = [multiprocessing.Process(target=_follower, args=(p,), daemon=True) for p in ports[1:3]]
        leader = multiprocessing.Process(target=_leader, args=(ports[3], ports[1:3]), daemon=True)
        for process in (*followers, leader):
            process.start()
        relay = _measure(ports[3], args.count, payload)
        for process in (leader, *followers):
            process.join(5)
        if args.work:
            with tempfile.TemporaryDirectory(prefix="meshq-floor-") as tmp:
                followers = [multiprocessing.Process(target=_follower_work, args=(p, f"{tmp}/f{p}"), daemon=True)
                             for p in ports[1:3]]
                leader = multiprocessing.Process(target=_leader_work, args=(ports[3], ports[1:3], f"{tmp}/leader"),
                                                 daemon=True)
                for process in (*followers, leader):
                    process.start()
                worked = _measure_work(ports[3], args.count, payload)
                for process in (leader, *followers):
                    process.join(5)
    print(f"one hop  (client -> server -> client):                           {_percentiles(hop)}")
    print(f"quorum   (client -> leader -> 2 followers, first answer -> client): {_percentiles(relay)}")
    if worked:
        print(f"quorum + least work (--work: encode, verify, write, msgpack):      {_percentiles(worked)}")


class socket_ports:
    """Free TCP ports on 127.0.0.1 (bound and released; fine for a benchmark)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> list[int]:
        import socket

        sockets = [socket.socket() for _ in range(self.count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        ports = [sock.getsockname()[1] for sock in sockets]
        for sock in sockets:
            sock.close()
        return ports

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
