"""A pool of workers behind one service name: run workers on several machines, ask from anywhere.

    python examples/rpc_pool.py worker --seed HOST:PORT [--concurrency 4]    # on each worker machine
    python examples/rpc_pool.py ask --seed HOST:PORT --count 1000            # from any machine

Each worker serves ``pool.hash`` (idempotent: hashing twice is harmless, so a request whose worker
dies is retried on another). ``ask`` sends ``--count`` requests, ``--window`` at a time, and
prints how many each worker answered: meshq sends each request to the live worker with the
fewest requests outstanding, so the pool shares the load, and a worker that stops or dies is
left out within the failure timeout. Use ``--interface IP`` for mDNS instead of ``--seed``.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import socket
import time

from _connect import connection_args, node_options

import meshq

SERVICE = "pool.hash"


def worker(args) -> None:
    name = f"{socket.gethostname()}-{os.getpid()}"

    def handle(payload: bytes) -> bytes:
        digest = payload
        for _ in range(args.rounds):
            digest = hashlib.sha256(digest).digest()
        return f"{name} {digest.hex()}".encode()

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    with meshq.Node(role="client", **node_options(args)) as node:
        node.serve(SERVICE, handle, concurrency=args.concurrency, idempotent=True)
        print(f"worker {name} serving {SERVICE} (concurrency {args.concurrency}); Ctrl-C to stop", flush=True)
        try:
            deadline = time.monotonic() + args.seconds if args.seconds else None
            while not stopping and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass


def ask(args) -> None:
    with meshq.Node(role="client", **node_options(args)) as node:
        deadline = time.monotonic() + args.wait
        while True:  # until a worker is known (a fresh node hears the mesh within a second or so)
            try:
                node.request(SERVICE, b"hello", timeout=args.timeout)
                break
            except meshq.NoRespondersError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no worker serves {SERVICE} after {args.wait} s: start one with "
                                     "`python examples/rpc_pool.py worker --seed ...`") from None
                time.sleep(0.2)
        by_worker: collections.Counter = collections.Counter()
        started = time.monotonic()
        window = []
        for i in range(args.count):
            window.append(node.request_async(SERVICE, f"job-{i}".encode(), timeout=args.timeout))
            if len(window) >= args.window:
                by_worker[window.pop(0).result().split(b" ", 1)[0].decode()] += 1
        for future in window:
            by_worker[future.result().split(b" ", 1)[0].decode()] += 1
        elapsed = time.monotonic() - started
        print(f"{args.count} replies from {len(by_worker)} workers in {elapsed:.2f} s")
        for name, count in sorted(by_worker.items()):
            print(f"  {name}: {count}")


def main() -> None:
    parser = connection_args("a pool of workers behind one service name")
    parser.add_argument("role", choices=["worker", "ask"])
    parser.add_argument("--concurrency", type=int, default=4, help="worker: requests handled at once")
    parser.add_argument("--rounds", type=int, default=1000, help="worker: sha256 rounds per request")
    parser.add_argument("--seconds", type=float, default=0.0, help="worker: stop after this long (0: run until Ctrl-C)")
    parser.add_argument("--count", type=int, default=1000, help="ask: requests to send")
    parser.add_argument("--window", type=int, default=32, help="ask: requests in flight")
    parser.add_argument("--timeout", type=float, default=10.0, help="ask: seconds per request")
    parser.add_argument("--wait", type=float, default=10.0, help="ask: seconds to wait for a first worker")
    args = parser.parse_args()
    worker(args) if args.role == "worker" else ask(args)


if __name__ == "__main__":
    main()
