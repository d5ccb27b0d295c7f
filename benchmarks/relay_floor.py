"""The latency floor of a synchronous quorum write on this machine, with raw pyzmq and no meshq.

A synchronous ``acks=quorum`` produce with replication factor 3 is, at best: the client
sends the batch to the leader; the leader forwards it to both followers; the first
follower's answer completes the quorum; the leader answers the client. This script runs
exactly that message pattern with bare pyzmq sockets — four processes on 127.0.0.1 (client,
leader, two followers), DEALER to ROUTER as meshq uses them, no encoding, no log, no fsync —
and prints the round trip's percentiles next to a one-hop request/reply. Whatever meshq
adds comes on top of this.

    python benchmarks/relay_floor.py [--count 5000] [--bytes 100]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import zmq


def _follower(port: int) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    while True:
        route, body = router.recv_multipart()
        if body == b"stop":
            return
        router.send_multipart([route, body[:8]])  # the request id: "I have it"


def _leader(port: int, follower_ports: list[int]) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    followers = []
    for follower_port in follower_ports:
        dealer = context.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{follower_port}")
        followers.append(dealer)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    for dealer in followers:
        poller.register(dealer, zmq.POLLIN)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--bytes", type=int, default=100)
    args = parser.parse_args()
    payload = b"x" * args.bytes
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
    print(f"one hop  (client -> server -> client):                           {_percentiles(hop)}")
    print(f"quorum   (client -> leader -> 2 followers, first answer -> client): {_percentiles(relay)}")


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
