"""``meshq bench rpc``: request/reply across two nodes in two processes, against raw pyzmq and NATS core.

Theory of operation
-------------------
A child process runs a storage node serving ``bench.echo`` (the handler returns its payload);
this process runs a client node that asks it. Each round measures, in this order:

* **one at a time** (``--sync-requests``): ``node.request`` in a loop, each call timed
  (``perf_counter_ns``): p50 / p99 latency;
* **pipelined** (``--requests``): ``node.request_async`` keeping ``--window`` requests in
  flight: requests per second.

The same two measures are taken in the same run for the floor, a raw pyzmq DEALER (this
process) to ROUTER (a child process that echoes each message), and — when ``nats-server`` is
on the PATH and ``nats-py`` is importable — for NATS core request/reply (a server on
127.0.0.1 started and stopped by PID, a child process answering on ``bench.echo``, and this
process calling ``nc.request`` one at a time, then with ``--window`` requests in flight).
Payloads are ``--value-bytes`` random bytes. Every system runs ``--rounds`` rounds, in
alternation so that load on the machine hits each alike; the report gives the median round
with min and max, the CPU time (user + system, from rusage and /proc) of both processes per
request, the wall time (NATS: the CPU of nats-server and of the responding client), and the ratios meshq / raw pyzmq and meshq / NATS. Figures are never
asserted: targets are reported as PASS or MISS.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import zmq

from meshq.bench.console import _RoundsBar
from meshq.bench.cpu import _machine, _thread_cpu
from meshq.bench.errors import BenchError
from meshq.bench.procs import READY_TIMEOUT_S, _Child
from meshq.bench.stats import _percentiles_us
from meshq.testing.ports import free_port

SERVICE = "bench.echo"
WARMUP = 200
PHASE_TIMEOUT_S = 120.0


# ------------------------------------------------------------------ children
def _serve_main() -> None:
    """Child: a storage node serving ``bench.echo`` until SIGTERM."""
    import meshq

    cluster, data_dir, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with meshq.Node(cluster=cluster, data_dir=data_dir, mdns=False, partitions=1, replication_factor=1) as node:
        node.serve(SERVICE, lambda payload: payload, concurrency=concurrency)
        print(json.dumps({"event": "ready", "address": node.address}), flush=True)
        while not stop:
            time.sleep(0.1)


def _raw_router_main() -> None:
    """Child: a raw pyzmq ROUTER echoing every message, until SIGTERM."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"event": "ready", "port": port}), flush=True)
    recv, send = router.recv_multipart, router.send_multipart
    try:
        while True:
            send(recv())
    finally:
        router.close(0)


def _nats_responder_main() -> None:
    """Child: a nats-py subscriber answering ``bench.echo`` with its payload, until SIGTERM."""
    import nats

    url = sys.argv[1]

    async def run() -> None:
        nc = await nats.connect(url)

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(SERVICE, cb=echo)
        await nc.flush()
        print(json.dumps({"event": "ready"}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await nc.close()

    asyncio.run(run())


def _child(main: str, args: list[str], workdir: str, name: str) -> _Child:
    return _Child([sys.executable, "-c", f"from meshq.bench.rpc import {main} as m; m()", *args],
                  os.path.join(workdir, f"{name}.stderr"))


# ------------------------------------------------------------------ measuring
class _Cpu:
    """CPU seconds of this process (rusage) and of the serving children (/proc, every thread)."""

    def __init__(self, child_pid: int | tuple[int, ...]) -> None:
        self.child_pids = child_pid if isinstance(child_pid, tuple) else (child_pid,)
        self.start = self._read()

    def _read(self) -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        child = sum(cpu for pid in self.child_pids for _name, cpu in _thread_cpu(pid).values())
        return usage.ru_utime + usage.ru_stime, child

    def per_request_us(self, count: int) -> dict[str, float]:
        end = self._read()
        return {"caller_cpu_us": (end[0] - self.start[0]) / count * 1e6,
                "server_cpu_us": (end[1] - self.start[1]) / count * 1e6}


def _timed_sync(call: Any, payload: bytes, count: int, child_pid: int | tuple[int, ...]) -> dict[str, Any]:
    samples = []
    cpu = _Cpu(child_pid)
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter_ns()
        call(payload)
        samples.append(time.perf_counter_ns() - t0)
    wall_s = time.perf_counter() - started
    return {**_percentiles_us(samples), "wall_s": wall_s, **cpu.per_request_us(count)}


def _meshq_round(client: Any, payload: bytes, args: Any, child_pid: int) -> dict[str, Any]:
    def call(data: bytes) -> None:
        if client.request(SERVICE, data, timeout=10.0) != data:
            raise BenchError("meshq replied something else than the request")

    sync = _timed_sync(call, payload, args.sync_requests, child_pid)
    cpu = _Cpu(child_pid)
    started = time.perf_counter()
    window: list = []
    for _ in range(args.requests):
        window.append(client.request_async(SERVICE, payload, timeout=30.0))
        if len(window) >= args.window:
            for future in window[: args.window // 2]:
                future.result(PHASE_TIMEOUT_S)
            del window[: args.window // 2]
    for future in window:
        future.result(PHASE_TIMEOUT_S)
    wall_s = time.perf_counter() - started
    return {"sync": sync, "pipelined": {"requests_per_s": args.requests / wall_s, "wall_s": wall_s,
                                        **cpu.per_request_us(args.requests)}}


def _raw_round(dealer: zmq.Socket, payload: bytes, args: Any, child_pid: int) -> dict[str, Any]:
    send, recv = dealer.send_multipart, dealer.recv_multipart

    def call(data: bytes) -> None:
        send([data])
        recv()

    sync = _timed_sync(call, payload, args.sync_requests, child_pid)
    cpu = _Cpu(child_pid)
    started = time.perf_counter()
    in_flight = 0
    for _ in range(args.requests):
        send([payload])
        in_flight += 1
        if in_flight >= args.window:
            recv()
            in_flight -= 1
    for _ in range(in_flight):
        recv()
    wall_s = time.perf_counter() - started
    return {"sync": sync, "pipelined": {"requests_per_s": args.requests / wall_s, "wall_s": wall_s,
                                        **cpu.per_request_us(args.requests)}}


class _Nats:
    """NATS core: a server on 127.0.0.1, a responder child, and this process's client (own event loop)."""

    def __init__(self, workdir: str) -> None:
        import nats

        self.port = free_port()
        self.server = _Child([shutil.which("nats-server") or "nats-server", "-a", "127.0.0.1", "-p", str(self.port)],
                             os.path.join(workdir, "nats-server.stderr"))
        self.url = f"nats://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:  # until it listens (a refused connect here, not in nats-py's logs)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.server.stop()
                    raise BenchError(f"nats-server did not accept connections on port {self.port}: {exc}") from None
                time.sleep(0.05)
        self.nc = self.loop.run_until_complete(nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=0))
        self.responder = _child("_nats_responder_main", [self.url], workdir, "nats-responder")
        self.responder.wait_event("ready", READY_TIMEOUT_S)

    def round(self, payload: bytes, args: Any) -> dict[str, Any]:
        loop, nc = self.loop, self.nc

        def call(data: bytes) -> None:
            loop.run_until_complete(nc.request(SERVICE, data, timeout=10))

        servers = (self.server.pid, self.responder.pid)  # nats-server and the responding client
        sync = _timed_sync(call, payload, args.sync_requests, servers)

        async def pipelined() -> None:
            pending: set = set()
            for _ in range(args.requests):
                pending.add(asyncio.ensure_future(nc.request(SERVICE, payload, timeout=30)))
                if len(pending) >= args.window:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
            if pending:
                for task in (await asyncio.wait(pending))[0]:
                    task.result()

        cpu = _Cpu(servers)
        started = time.perf_counter()
        loop.run_until_complete(pipelined())
        wall_s = time.perf_counter() - started
        return {"sync": sync, "pipelined": {"requests_per_s": args.requests / wall_s, "wall_s": wall_s,
                                            **cpu.per_request_us(args.requests)}}

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.nc.close())
        except Exception:
            pass
        self.loop.close()
        self.responder.stop()
        self.server.stop()


def _nats_available() -> str | None:
    """None when NATS core can be measured, else why not."""
    if shutil.which("nats-server") is None:
        return "nats-server is not installed (apt-get install nats-server)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install nats-py, into the benchmark's environment only)"
    return None


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over the rounds of the figures that matter."""
    def stat(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    return {
        "sync_p50_us": stat([r["sync"]["p50_us"] for r in rounds]),
        "sync_p99_us": stat([r["sync"]["p99_us"] for r in rounds]),
        "sync_caller_cpu_us": stat([r["sync"]["caller_cpu_us"] for r in rounds]),
        "sync_server_cpu_us": stat([r["sync"]["server_cpu_us"] for r in rounds]),
        "pipelined_requests_per_s": stat([r["pipelined"]["requests_per_s"] for r in rounds]),
        "pipelined_caller_cpu_us": stat([r["pipelined"]["caller_cpu_us"] for r in rounds]),
        "pipelined_server_cpu_us": stat([r["pipelined"]["server_cpu_us"] for r in rounds]),
        "rounds": rounds,
    }


def run_rpc_bench(args: Any) -> int:
    """``meshq bench rpc``; returns the exit code."""
    problems = []
    if args.rounds < 3:
        problems.append("--rounds must be at least 3 (the report gives the median with min and max)")
    if args.requests < 1 or args.sync_requests < 1:
        problems.append("--requests and --sync-requests must be at least 1")
    if not 1 <= args.window <= 100_000:
        problems.append("--window must be from 1 to 100000")
    if args.value_bytes < 1:
        problems.append("--value-bytes must be at least 1")
    if problems:
        for problem in problems:
            print(f"meshq bench: {problem}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="meshq-bench-rpc-")
    try:
        report = _measure(args, workdir)
    except BenchError as exc:
        print(f"meshq bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _render(report)
    return 0


def _measure(args: Any, workdir: str) -> dict[str, Any]:
    import meshq

    payload = os.urandom(args.value_bytes)
    report: dict[str, Any] = {
        "scenario": "rpc", "machine": _machine(),
        "config": {"requests": args.requests, "sync_requests": args.sync_requests, "window": args.window,
                   "rounds": args.rounds, "value_bytes": args.value_bytes, "server_concurrency": args.server_concurrency,
                   "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
    }
    nats_missing = _nats_available()
    cluster = f"bench-rpc-{os.getpid()}"
    server = _child("_serve_main", [cluster, os.path.join(workdir, "server"), str(args.server_concurrency)], workdir,
                    "server")
    raw = _child("_raw_router_main", [], workdir, "raw")
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, int(PHASE_TIMEOUT_S * 1000))
    nats_peer = None
    client = None
    try:
        address = server.wait_event("ready", READY_TIMEOUT_S)["address"]
        dealer.connect(f"tcp://127.0.0.1:{raw.wait_event('ready', READY_TIMEOUT_S)['port']}")
        client = meshq.Node(cluster=cluster, seeds=[address.removeprefix("tcp://")], mdns=False, role="client").start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                client.request(SERVICE, payload, timeout=2.0)
                break
            except meshq.MeshqError as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"the serving node never answered: {exc}") from None
                time.sleep(0.1)
        if nats_missing is None:
            nats_peer = _Nats(workdir)
        for _ in range(WARMUP):
            client.request(SERVICE, payload, timeout=10.0)
            dealer.send_multipart([payload])
            dealer.recv_multipart()
        rounds: dict[str, list] = {"meshq": [], "raw_pyzmq": [], "nats_core": []}
        with _RoundsBar("bench rpc", args.rounds) as bar:
            for index in range(args.rounds):
                print(f"meshq bench rpc: round {index + 1} of {args.rounds}", file=sys.stderr, flush=True)
                rounds["raw_pyzmq"].append(_raw_round(dealer, payload, args, raw.pid))
                rounds["meshq"].append(_meshq_round(client, payload, args, server.pid))
                if nats_peer is not None:
                    rounds["nats_core"].append(nats_peer.round(payload, args))
                bar.advance()
        report["meshq"] = _summary(rounds["meshq"])
        report["raw_pyzmq"] = _summary(rounds["raw_pyzmq"])
        report["nats_core"] = _summary(rounds["nats_core"]) if nats_peer is not None else {"skipped": nats_missing}
        report["server_status"] = [s for s in client.status()["services"] if s["service"] == SERVICE]
    finally:
        if client is not None:
            client.stop()
        if nats_peer is not None:
            nats_peer.close()
        dealer.close(0)
        context.term()
        server.stop()
        raw.stop()
    report["ratios"] = _ratios(report)
    return report


def _ratios(report: dict[str, Any]) -> dict[str, Any]:
    meshq, raw, nats_core = report["meshq"], report["raw_pyzmq"], report["nats_core"]
    p50 = meshq["sync_p50_us"]["median"]
    rate = meshq["pipelined_requests_per_s"]["median"]
    out: dict[str, Any] = {
        "p50_vs_raw_pyzmq": p50 / raw["sync_p50_us"]["median"],
        "pipelined_vs_raw_pyzmq": rate / raw["pipelined_requests_per_s"]["median"],
        "targets": {"p50 <= 1.3x raw pyzmq": p50 <= 1.3 * raw["sync_p50_us"]["median"],
                    "pipelined >= 100,000 req/s": rate >= 100_000},
    }
    if "sync_p50_us" in nats_core:
        out["p50_vs_nats_core"] = p50 / nats_core["sync_p50_us"]["median"]
        out["pipelined_vs_nats_core"] = rate / nats_core["pipelined_requests_per_s"]["median"]
        out["targets"]["p50 <= NATS core p50"] = p50 <= nats_core["sync_p50_us"]["median"]
    return out


def _render(report: dict[str, Any]) -> None:
    config = report["config"]
    print(f"meshq bench rpc — {config['value_bytes']}-byte payloads, {config['rounds']} rounds (median [min-max]); "
          f"machine: {report['machine']['nproc']} cores, Python {report['machine']['python']}")
    print(f"command: {config['command']}")
    header = f"{'':12} {'p50 µs':>24} {'p99 µs':>24} {'pipelined req/s':>30} {'CPU µs/req (caller+server)':>28}"
    print(header)
    for name in ("meshq", "raw_pyzmq", "nats_core"):
        figures = report[name]
        if "skipped" in figures:
            print(f"{name:12} skipped: {figures['skipped']}")
            continue

        def cell(key: str, fmt: str = "{:.0f}", figures: dict = figures) -> str:
            s = figures[key]
            return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"

        cpu = figures["sync_caller_cpu_us"]["median"] + figures["sync_server_cpu_us"]["median"]
        print(f"{name:12} {cell('sync_p50_us'):>24} {cell('sync_p99_us'):>24} "
              f"{cell('pipelined_requests_per_s'):>30} {cpu:>28.0f}")
    ratios = report["ratios"]
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if isinstance(v, float)))
    print("targets: " + ", ".join(f"{k}: {'PASS' if ok else 'MISS'}" for k, ok in ratios["targets"].items()))


__all__ = ["run_rpc_bench"]
