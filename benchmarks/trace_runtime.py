"""Time the steps of each runtime loop iteration, on both sides, for one produce mode.

A diagnostic, not the benchmark: it wraps meshq's runtime internals (``Runtime._drain_*``,
``_send``, ``NodeCore.handle``, ``wire.decode``, ``zmq.Poller.poll``) with timers, in this
process (the producer) and in a ``meshq node`` child started through this same file, then
prints calls, total and µs per call of each, and how long each runtime thread was busy per
loop iteration. The wrappers add about 1 µs per call. Loopback only, no mDNS; the child is
stopped by PID and its data directory removed.

    python benchmarks/trace_runtime.py sync 3000      # produce(), one at a time
    python benchmarks/trace_runtime.py batch 300      # produce_batch of 1000 records, 32 in flight
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from typing import Any

import zmq

_ns = time.perf_counter_ns
_stats: dict[str, list] = collections.defaultdict(list)  # name -> durations (ns)
_busy: dict[str, list] = collections.defaultdict(lambda: [0, 0, 0])  # thread -> [iterations, busy ns, idle ns]
_local = threading.local()


def _timed(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = _ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _stats[name].append(_ns() - start)

    return wrapper


def install() -> None:
    from meshq.core import node as core_node
    from meshq.io import runtime as rt

    original_poll = zmq.Poller.poll

    def poll(self: Any, timeout: Any = None) -> Any:
        start = _ns()
        last = getattr(_local, "last", None)
        result = original_poll(self, timeout)
        end = _ns()
        entry = _busy[threading.current_thread().name]
        if last is not None:
            entry[0] += 1
            entry[1] += start - last
        entry[2] += end - start
        _local.last = end
        return result

    zmq.Poller.poll = poll  # type: ignore[method-assign]
    for name in ("_drain_router", "_drain_dealer", "_drain_commands", "_flush_syncs", "_execute"):
        if hasattr(rt.Runtime, name):
            setattr(rt.Runtime, name, _timed(f"Runtime.{name}", getattr(rt.Runtime, name)))
    if hasattr(rt, "_send"):
        rt._send = _timed("runtime._send (one message)", rt._send)
    rt.wire.decode = _timed("wire.decode", rt.wire.decode)
    core_node.NodeCore.handle = _timed("NodeCore.handle", core_node.NodeCore.handle)


def reset() -> None:
    _stats.clear()
    _busy.clear()


def report(label: str, per: int | None = None) -> None:
    lines = [f"--- {label}"]
    for thread, (iterations, busy, idle) in _busy.items():
        lines.append(f"  thread {thread}: {iterations} loop iterations, busy {busy / 1e6:.0f} ms, "
                     f"waiting in poll {idle / 1e6:.0f} ms")
    lines.append(f"  {'step':32s} {'calls':>7s} {'total ms':>9s} {'us/call':>8s} {'p50 us':>7s}"
                 + (f" {'us per op':>9s}" if per else ""))
    for name, samples in sorted(_stats.items(), key=lambda kv: -sum(kv[1])):
        ordered = sorted(samples)
        total = sum(ordered)
        line = (f"  {name:32s} {len(ordered):7d} {total / 1e6:9.1f} {total / 1e3 / len(ordered):8.1f} "
                f"{ordered[len(ordered) // 2] / 1e3:7.1f}")
        if per:
            line += f" {total / 1e3 / per:9.1f}"
        lines.append(line)
    print("\n".join(lines), file=sys.stderr, flush=True)


def _node_main(argv: list[str]) -> int:
    install()
    atexit.register(report, "node (since start, warm-up included)")
    from meshq.cli import main

    return main(argv)


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "sync"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else (3000 if mode == "sync" else 300)
    install()
    from meshq.node import Node

    work = tempfile.mkdtemp(prefix="meshq-trace-")
    stderr = open(os.path.join(work, "node.stderr"), "w")
    child = subprocess.Popen([sys.executable, __file__, "--node", "node", "--data", os.path.join(work, "data"),
                              "--host", "127.0.0.1", "--port", "0", "--no-mdns", "--log-level", "WARNING"],
                             stdout=subprocess.PIPE, stderr=stderr, text=True)
    client = None
    try:
        line = child.stdout.readline() if child.stdout else ""
        address = json.loads(line)["address"].split("://", 1)[1]
        client = Node(seeds=[address], mdns=False, role="client").start()
        client.wait_ready(10)
        topic = f"trace-{uuid.uuid4().hex[:8]}"
        client.create_topic(topic, partitions=8, replication_factor=1)
        values = [os.urandom(100) for _ in range(1000)]
        for i in range(300):
            client.produce(topic, values[i], acks="leader")
        client.produce_batch(topic, values, acks="leader").result(10)
        reset()
        start = time.perf_counter()
        if mode == "sync":
            for i in range(count):
                client.produce(topic, values[i % 1000], acks="leader")
        else:
            window: deque = deque()
            for _ in range(count):
                window.append(client.produce_batch(topic, values, acks="leader"))
                if len(window) >= 32:
                    window.popleft().result(30)
            while window:
                window.popleft().result(30)
        elapsed = time.perf_counter() - start
        unit = "produce" if mode == "sync" else "batch of 1000"
        print(f"{mode}: {count} x {unit} in {elapsed:.3f} s = {elapsed / count * 1e6:.1f} us per {unit}",
              file=sys.stderr)
        report(f"producer ({mode}, timed part only)", per=count)
    finally:
        if client is not None:
            client.stop()
        try:
            os.kill(child.pid, signal.SIGTERM)
            child.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.kill(child.pid, signal.SIGKILL)
            child.wait(5)
        stderr.close()
        try:
            with open(os.path.join(work, "node.stderr")) as f:
                node_report = f.read()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        sys.stderr.write(node_report)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--node":
        sys.exit(_node_main(sys.argv[2:]))
    sys.exit(main())
