"""``meshq bench produce``, ``replication`` and ``rebalance``: producer throughput, latency, failover, partition moves.

Theory of operation
-------------------
One invocation measures, on this machine, in this order:

1. **Baseline** — a raw pyzmq DEALER (this process) to ROUTER (a child process) on
   127.0.0.1. The sender packs ``--batch`` values of ``--value-bytes`` random bytes into
   one msgpack array per frame (packing is part of the measured loop: any producer must
   pack), sends ``[header, payload]`` where ``header`` is ``msgpack([seq, count])``, and
   keeps a window of frames in flight. The receiver unpacks only the tiny header, counts
   records and answers a tiny ack per frame. It reports its count at the end, so the
   baseline is checked too. A synchronous round trip (one record, wait for the ack) is
   also timed: the floor for synchronous latency in Python + ZeroMQ.
2. **meshq** — a ``meshq node`` child process (``--fsync`` as given) and, in this
   process, a ``meshq.Node(role="client")`` producer:

   a. ``produce_batch`` in chunks of ``--batch`` records with a bounded window of
      outstanding futures (the pipelined figure);
   b. ``produce_async`` per record then ``flush()`` (``--records / 5`` records);
   c. ``--sync-records`` sequential ``produce`` calls, each timed with
      ``perf_counter_ns`` after a warm-up.

   Then the sum of the node's high watermarks over the benchmark topics must equal the
   number of acknowledged records, so a benchmark that stores nothing cannot pass.

The short pipelined runs are repeated (``BASELINE_REPEATS``, ``REPEATS``) and the median
is reported with every run's rate. During each timed section the CPU time of every thread
of the processes involved is read from ``/proc/<pid>/task/*/stat`` and the whole
machine's from ``/proc/stat``: the report says which thread was busy (the bottleneck) and
how much CPU other processes took (on a small shared machine they distort every figure).

With ``--seed HOST:PORT`` an already running node is used instead of a child (the topics
get unique names, so the check still holds). Every child process is stopped by its PID in
``finally`` blocks and every temporary directory is removed. No mDNS: the client and the node talk over 127.0.0.1 only.

``meshq bench replication`` (issue 5) runs, in one invocation:

1. the baseline above, and the single-node figure above (``produce_batch`` and
   synchronous ``produce``, replication factor 1, ``acks=leader``; no ``produce_async``);
2. ``--nodes`` (3) ``meshq node`` children on 127.0.0.1 (mDNS off, fixed ports; the first
   forms the cluster, the others join through it as a seed), and once the agreed
   membership (the ring) holds all of them, per acks level ``leader`` then ``quorum``: a
   topic of 8 partitions with ``--replication-factor`` (3) replicas, a wait (at most
   ``--in-sync-timeout``) until every replica is in sync, then the pipelined
   ``produce_batch`` run and the synchronous run as in 2a/2c, and the check that the
   high watermarks add up to the acknowledged records. A failure (for instance
   ``NotEnoughReplicasError`` at ``acks=quorum``) is recorded and the run goes on;
3. ``--failover-repeats`` (3) failovers on a fresh replicated topic: one writer thread
   per partition produces one record at a time (``--failover-acks``, each call with a
   ``--failover-timeout`` of 0.5 s) for 1 s, then a node leading at least one partition
   (rotating over the nodes) is killed with SIGKILL. For each partition it led, the
   failover time is from just before ``os.kill`` to the end of the first successful
   call *started* after it; the repeat's figure is the last of its partitions to come
   back. The writers of the other partitions give the longest stall they saw. Then the
   killed node is restarted on its data (same ports) and the next repeat waits until it
   is back and in sync.

Targets (PASS/MISS, never asserted): pipelined ``acks=quorum`` >= 500,000 records/s,
synchronous ``acks=quorum`` p50 <= 400 µs, failover <= ``failure_timeout_s`` + 2 s (the
nodes run with the ``NodeConfig`` default). The exit status is 1 when a part could not be
measured or a check failed; the report (table or ``--json``) says which and why.

``meshq bench rebalance`` measures how fast a membership change moves data (docs/architecture.md,
Rebalancing), on the same kind of cluster (``_Cluster``: ``--nodes`` children, mDNS off, seeds):

1. **Preload**: a topic of ``REBALANCE_PARTITIONS`` (12) partitions with
   ``--replication-factor`` (3) replicas gets ``--records`` values of ``--value-bytes`` at
   ``acks=quorum`` (the pipelined ``produce_batch`` loop above, one run); then every replica
   must be in sync, and the size of every node's data directory is recorded.
2. **Join**: one more node is started, seeded with the others. The clock runs from just before
   its process starts until a status shows the ring of all the nodes, ``handoffs == 0``, every
   partition on the replica set ``HashRing`` computes for the new membership and every replica
   in sync (polled every ``REBALANCE_POLL_S``). Reported: that time, when the node printed
   ready and when the ring changed, the partitions whose replica set changed beside those the
   ring predicts (``meshq.core.ring.moved_partitions`` over the old and new members), the
   bytes moved (the size, at the start, of the moved partitions' directories) and MB/s, and
   what the new node's data directory holds at the end.
3. **Leave** (when ``Node.leave`` exists; ``--skip-leave`` skips it): one of the first nodes
   that does not lead the metadata log is asked to leave; the same clock and figures, the
   receivers being the other nodes; the leaving node must exit by itself.
4. With ``--load-rate N|max``, a producer thread (``produce_batch`` of ``LOAD_BATCH`` records,
   ``LOAD_WINDOW`` in flight, ``acks=quorum``, paced to N records/s) writes from
   ``LOAD_BEFORE_S`` before the join to the end: its throughput and batch latency in the
   ``LOAD_BEFORE_S`` before each move and during it show what the copy costs producers.

At the end the high watermarks must add up to the acknowledged records (plus at most those of
the producer's failed batches, whose fate is unknown). Per-thread CPU of the preload and of each
move is reported as for the other scenarios.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgpack
import zmq

from meshq.errors import MeshqError

# Targets from the performance issue (docs/performance.md).
TARGET_PIPELINED_RPS = 1_000_000
TARGET_BASELINE_RATIO = 0.40
TARGET_SYNC_P50_US = 150.0

# Targets of `bench replication` (issue 5, docs/performance.md): printed as PASS/MISS, never asserted.
TARGET_QUORUM_PIPELINED_RPS = 500_000
TARGET_QUORUM_SYNC_P50_US = 400.0
TARGET_FAILOVER_SLACK_S = 2.0  # failover <= failure_timeout_s + this

BASELINE_WINDOW = 16  # frames in flight in the raw pyzmq baseline
BATCH_WINDOW = 32  # produce_batch futures in flight (8 partitions x max 5 in flight each = 40)
SYNC_WARMUP = 500
PHASE_TIMEOUT_S = 60.0  # a phase that takes longer than this is aborted
READY_TIMEOUT_S = 20.0
PARTITIONS = 8
REPEATS = 3  # timed repetitions of the meshq produce_batch run; the median is reported
BASELINE_REPEATS = 5  # the baseline run is short (~0.1 s), so it is repeated more
CLUSTER_READY_TIMEOUT_S = 60.0  # members alive and every partition led, after a start or a restart
FAILOVER_PRE_KILL_S = 1.0  # writers run this long before the kill (and must succeed on the victim's partitions)
FAILOVER_WRITER_PAUSE_S = 0.005  # between one failover writer's calls: the timing resolution, a light load
REBALANCE_PARTITIONS = 12  # partitions of the `bench rebalance` topic
REBALANCE_POLL_S = 0.25  # status polls while a partition move runs: the timing resolution of a join or leave
LOAD_WINDOW = 4  # produce_batch calls in flight of the producer that writes during the moves
LOAD_BATCH = 100  # records per call of that producer (small: many latency samples per second)
LOAD_TIMEOUT_S = 10.0  # timeout of each of its batches
LOAD_BEFORE_S = 5.0  # it writes this long before a move: the "before" figures
try:
    _CLK_TCK = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    _CLK_TCK = 100

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class BenchError(Exception):
    """The benchmark could not run or its result failed verification."""


# ---------------------------------------------------------------------- baseline server (child)
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


# ---------------------------------------------------------------------- helpers
def _percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)

    def pick(q: float) -> float:
        return ordered[min(n - 1, max(0, int(round(q * n)) - 1))] / 1000.0

    return {
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "max_us": ordered[-1] / 1000.0,
        "mean_us": statistics.fmean(ordered) / 1000.0,
        "count": n,
    }


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import meshq

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(str(p) for p in msgpack.version),
        "meshq": meshq.__version__,
    }


class _Child:
    """A child process that prints one JSON line per event on stdout."""

    def __init__(self, argv: list[str], stderr_path: str, env: dict | None = None) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                     env=env, close_fds=True)
        self.lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"bench-reader-{self.proc.pid}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                self.lines.put(raw)
        except (OSError, ValueError):  # stdout closed by stop()
            pass
        finally:
            self.lines.put(None)

    def wait_event(self, event: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"child {self.pid} did not report {event!r} within {timeout_s:.0f} s{self._tail()}")
            try:
                raw = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if raw is None:
                self.proc.wait(5)
                raise BenchError(f"child {self.pid} exited with {self.proc.returncode} before {event!r}{self._tail()}")
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("event") == event:
                return message

    def _tail(self) -> str:
        try:
            self._stderr.flush()
            with open(self.stderr_path, "rb") as f:
                data = f.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; its stderr ends with:\n{data}" if data else ""

    def kill(self) -> float:
        """SIGKILL (kill -9) by PID and reap; returns ``time.monotonic()`` just before the signal."""
        signalled_at = time.monotonic()
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()
        return signalled_at

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit."""
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        except ProcessLookupError:
            pass
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()


def _values(count: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def _check_deadline(start: float, what: str, limit_s: float = PHASE_TIMEOUT_S) -> None:
    if time.perf_counter() - start > limit_s:
        raise BenchError(f"{what} took longer than {limit_s:.0f} s; aborted")


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every thread of ``pid``, from /proc (Linux; {} elsewhere)."""
    out: dict[int, tuple[str, float]] = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{base}/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        close = stat.rindex(")")
        fields = stat[close + 2:].split()
        out[int(tid)] = (stat[stat.index("(") + 1:close], (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def _machine_busy() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK, sum(fields) / _CLK_TCK


def _other_load(seconds: float = 1.0) -> float | None:
    """CPU used by the whole machine over ``seconds`` while this benchmark is idle, in cores."""
    first = _machine_busy()
    time.sleep(seconds)
    second = _machine_busy()
    if first is None or second is None:
        return None
    return (second[0] - first[0]) / seconds


def _thread_label(thread: threading.Thread) -> str:
    if type(thread).__name__ == "GarbageCollectorThread":
        return "pyzmq gc thread (zero-copy sends)"
    if thread.name.startswith("meshq-"):
        return "meshq runtime"
    return thread.name


class _CpuSampler:
    """Per-thread CPU use of some processes over the timed sections of a run."""

    def __init__(self, processes: dict[str, int]) -> None:
        self.processes = processes
        self.elapsed = 0.0
        self.cpu: dict[tuple[str, int], list] = {}  # (process, tid) -> [name, seconds]
        self._before: dict[str, dict[int, tuple[str, float]]] = {}
        self._t0 = 0.0
        self.machine_busy = 0.0
        self._machine0: tuple[float, float] | None = None

    def start(self) -> None:
        self._before = {label: _thread_cpu(pid) for label, pid in self.processes.items()}
        self._machine0 = _machine_busy()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.elapsed += time.perf_counter() - self._t0
        machine = _machine_busy()
        if machine is not None and self._machine0 is not None:
            self.machine_busy += machine[0] - self._machine0[0]
        for label, pid in self.processes.items():
            before = self._before.get(label, {})
            for tid, (name, seconds) in _thread_cpu(pid).items():
                entry = self.cpu.setdefault((label, tid), [name, 0.0])
                entry[1] += seconds - before.get(tid, (name, 0.0))[1]

    def report(self) -> list[dict[str, Any]]:
        """Threads that used at least 1 % of a core, as ``{process, thread, cpu_percent}``."""
        python_names = {t.native_id: _thread_label(t) for t in threading.enumerate()}
        others: collections.Counter = collections.Counter(
            label for (label, tid), (name, _s) in self.cpu.items()
            if tid != self.processes[label] and not name.startswith("ZMQbg"))
        rows = []
        for (label, tid), (name, seconds) in sorted(self.cpu.items()):
            if self.elapsed <= 0 or seconds / self.elapsed < 0.01:
                continue
            pid = self.processes[label]
            if pid == os.getpid() and tid in python_names:
                name = python_names[tid]
            elif tid == pid:
                name = "MainThread"
            elif not name.startswith("ZMQbg"):
                # a child's Python threads are unnamed in /proc; a node has one besides main
                name = ("meshq runtime" if label.startswith("node") and others[label] == 1
                        else f"thread {tid} ({name})")
            rows.append({"process": label, "thread": name, "cpu_percent": round(100 * seconds / self.elapsed, 1)})
        return rows

    def summary(self) -> dict[str, Any]:
        """Per-thread CPU plus the machine's total: ``other_percent`` is CPU used by other processes."""
        ours = sum(seconds for _name, seconds in self.cpu.values())
        out: dict[str, Any] = {"threads": self.report()}
        if self.elapsed > 0:
            out["ours_percent"] = round(100 * ours / self.elapsed, 1)
            out["machine_percent"] = round(100 * self.machine_busy / self.elapsed, 1)
            out["other_percent"] = round(max(0.0, 100 * (self.machine_busy - ours) / self.elapsed), 1)
        return out


# ---------------------------------------------------------------------- baseline (parent)
def _summarize_runs(runs: list[dict[str, Any]], value_bytes: int) -> dict[str, Any]:
    """The median run (by records/s) plus every run's rate."""
    ordered = sorted(runs, key=lambda r: r["records_per_s"])
    median = ordered[len(ordered) // 2]
    out = dict(median)
    out["mb_per_s"] = median["records_per_s"] * value_bytes / 1e6
    out["runs_records_per_s"] = [round(r["records_per_s"]) for r in runs]
    out["repeats"] = len(runs)
    return out


def _run_baseline(records: int, batch: int, value_bytes: int, sync_records: int, workdir: str) -> dict[str, Any]:
    child = _Child([sys.executable, "-c", "from meshq.bench import _baseline_router_main as m; m()"],
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


# ---------------------------------------------------------------------- meshq
def _start_node(args: Any, workdir: str) -> tuple[_Child, str]:
    data = os.path.join(workdir, "node-data")
    argv = [sys.executable, "-m", "meshq", "node", "--data", data, "--host", "127.0.0.1", "--port", "0",
            "--no-mdns", "--fsync", args.fsync, "--partitions", str(PARTITIONS), "--cluster", args.cluster,
            "--log-level", "WARNING"]
    child = _Child(argv, os.path.join(workdir, "node.stderr"))
    try:
        ready = child.wait_event("ready", READY_TIMEOUT_S)
    except BaseException:
        child.stop()
        raise
    address = ready["address"]  # tcp://127.0.0.1:PORT
    return child, address.split("://", 1)[1]


def _pipelined_batch(client: Any, topic: str, records: int, values: list[bytes], acks: str,
                     sampler: _CpuSampler, repeats: int = REPEATS, limit_s: float = PHASE_TIMEOUT_S) -> dict[str, Any]:
    batch = len(values)
    # warm-up (metadata, connection, first segment files): not timed, but counted
    acknowledged = 0
    for _ in range(5):
        client.produce_batch(topic, values, acks=acks).result(PHASE_TIMEOUT_S)
        acknowledged += batch
    produce_batch = client.produce_batch
    runs = []
    for _ in range(repeats):
        window: deque = deque()
        sent = 0
        sampler.start()
        start = time.perf_counter()
        while sent < records:
            n = min(batch, records - sent)
            window.append((produce_batch(topic, values if n == batch else values[:n], acks=acks), n))
            sent += n
            if len(window) >= BATCH_WINDOW:
                future, count = window.popleft()
                future.result(PHASE_TIMEOUT_S)
                acknowledged += count
                _check_deadline(start, "the produce_batch run", limit_s)
        while window:
            future, count = window.popleft()
            future.result(PHASE_TIMEOUT_S)
            acknowledged += count
        elapsed = time.perf_counter() - start
        sampler.stop()
        runs.append({"records": records, "seconds": elapsed, "records_per_s": records / elapsed})
    result = _summarize_runs(runs, len(values[0]))
    result.update({"window_futures": BATCH_WINDOW, "acknowledged": acknowledged, "cpu": sampler.summary()})
    return result


def _pipelined_async(client: Any, topic: str, records: int, values: list[bytes], acks: str,
                     sampler: _CpuSampler) -> dict[str, Any]:
    warm = min(100, len(values))
    for value in values[:warm]:
        client.produce_async(topic, value, acks=acks)
    client.flush(PHASE_TIMEOUT_S)
    produce_async = client.produce_async
    nvalues = len(values)
    futures = []
    append = futures.append
    sampler.start()
    start = time.perf_counter()
    for i in range(records):
        append(produce_async(topic, values[i % nvalues], acks=acks))
    client.flush(PHASE_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    sampler.stop()
    failed = [f for f in futures if f.exception(0) is not None]
    if failed:
        raise BenchError(f"{len(failed)} of {records} produce_async records failed: {failed[0].exception(0)!r}")
    return {"records": records, "seconds": elapsed, "records_per_s": records / elapsed,
            "mb_per_s": records * len(values[0]) / elapsed / 1e6, "acknowledged": records + warm,
            "cpu": sampler.summary()}


def _synchronous(client: Any, topic: str, records: int, values: list[bytes], acks: str,
                 sampler: _CpuSampler) -> dict[str, Any]:
    produce = client.produce
    nvalues = len(values)
    warm = min(SYNC_WARMUP, records)
    for i in range(warm):
        produce(topic, values[i % nvalues], acks=acks)
    clock = time.perf_counter_ns
    samples: list[int] = []
    append = samples.append
    sampler.start()
    start = time.perf_counter()
    for i in range(records):
        t0 = clock()
        produce(topic, values[i % nvalues], acks=acks)
        append(clock() - t0)
    elapsed = time.perf_counter() - start
    sampler.stop()
    result: dict[str, Any] = {"records": records, "seconds": elapsed,
                              "records_per_s": records / elapsed if elapsed > 0 else 0.0,
                              "acknowledged": records + warm, "cpu": sampler.summary()}
    if samples:
        result.update(_percentiles_us(samples))
    return result


def _high_watermarks(client: Any, topics: set[str]) -> int:
    status = client.status(timeout=10.0)
    total = 0
    for topic in status["topics"]:
        if topic["name"] in topics:
            total += sum(p["high_watermark"] for p in topic["partitions"])
    return total


def _run_meshq(args: Any, workdir: str, seeds: list[str], with_async: bool = True) -> dict[str, Any]:
    from meshq.node import Node

    child: _Child | None = None
    client: Any = None
    try:
        if not seeds:
            child, hostport = _start_node(args, workdir)
            seeds = [hostport]
        client = Node(cluster=args.cluster, seeds=seeds, mdns=False, role="client")
        client.start()
        client.wait_ready(timeout=READY_TIMEOUT_S)
        run_id = uuid.uuid4().hex[:8]
        topics = {name: f"bench-{run_id}-{name}" for name in ("batch", "async", "sync")}
        for topic in topics.values():
            client.create_topic(topic, partitions=PARTITIONS, replication_factor=1, retention_ms=None)
        values = _values(args.batch, args.value_bytes)
        processes = {"producer": os.getpid()}
        if child is not None:
            processes["node"] = child.pid
        result: dict[str, Any] = {"node_pid": child.pid if child else None, "fsync": args.fsync, "acks": args.acks,
                                  "partitions": PARTITIONS}
        result["produce_batch"] = _pipelined_batch(client, topics["batch"], args.records, values, args.acks,
                                                   _CpuSampler(processes))
        if with_async:
            async_records = max(1, args.records // 5)
            result["produce_async"] = _pipelined_async(client, topics["async"], async_records, values, args.acks,
                                                       _CpuSampler(processes))
        if args.sync_records > 0:
            result["produce"] = _synchronous(client, topics["sync"], args.sync_records, values, args.acks,
                                             _CpuSampler(processes))
        acknowledged = sum(result[k]["acknowledged"] for k in ("produce_batch", "produce_async", "produce")
                           if k in result)
        if args.acks == "none":
            time.sleep(0.5)  # fire-and-forget: give the node a moment to append what is in flight
        stored = _high_watermarks(client, set(topics.values()))
        result["verification"] = {"acknowledged": acknowledged, "high_watermark_sum": stored,
                                  "ok": stored == acknowledged}
        return result
    finally:
        try:
            if client is not None:
                client.stop()
        finally:
            if child is not None:
                child.stop()


# ---------------------------------------------------------------------- replicated cluster (``bench replication``)
def _progress(message: str) -> None:
    """One line on stderr per step of a long run, only when stderr is a terminal."""
    if sys.stderr.isatty():
        print(f"meshq bench: {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _default_failure_timeout_s() -> float:
    """The nodes' ``failure_timeout_s`` (``meshq node`` runs with the NodeConfig default)."""
    from meshq.config import NodeConfig

    return float(next(f.default for f in dataclasses.fields(NodeConfig) if f.name == "failure_timeout_s"))


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Cluster:
    """``count`` ``meshq node`` children on 127.0.0.1, mDNS off, with fixed ports so a killed node restarts in place.

    The first node forms the cluster alone; the others join through it as a seed. A
    restarted node gets every other node as a seed. Children are stopped by PID.
    """

    def __init__(self, count: int, workdir: str, args: Any, replication_factor: int) -> None:
        self.count = count
        self.workdir = workdir
        self.args = args
        self.replication_factor = replication_factor
        self.ports = [(_free_port(), _free_port()) for _ in range(count)]
        self.children: list[_Child | None] = [None] * count
        self.node_ids: list[str] = [""] * count
        self.launches = [0] * count
        self.launched_pids: list[int] = []  # every process this cluster started, for the report
        self.kills = [0] * count

    def seed(self, index: int) -> str:
        return f"127.0.0.1:{self.ports[index][0]}"

    @property
    def seeds(self) -> list[str]:
        return [self.seed(i) for i in range(self.count)]

    def data_dir(self, index: int) -> str:
        return os.path.join(self.workdir, f"cluster-node{index + 1}")

    def _launch(self, index: int, seeds: list[str]) -> None:
        port, pub_port = self.ports[index]
        argv = [sys.executable, "-m", "meshq", "node", "--data", self.data_dir(index),
                "--host", "127.0.0.1", "--port", str(port), "--pub-port", str(pub_port), "--no-mdns",
                "--fsync", self.args.fsync, "--partitions", str(PARTITIONS),
                "--replication-factor", str(self.replication_factor), "--cluster", self.args.cluster,
                "--log-level", "WARNING"]
        for seed in seeds:
            argv += ["--seed", seed]
        self.launches[index] += 1
        child = _Child(argv, os.path.join(self.workdir, f"cluster-node{index + 1}-{self.launches[index]}.stderr"))
        self.children[index] = child
        self.launched_pids.append(child.pid)

    def _wait_ready(self, index: int) -> None:
        child = self.children[index]
        assert child is not None
        self.node_ids[index] = child.wait_event("ready", READY_TIMEOUT_S)["node_id"]

    def start(self) -> None:
        self._launch(0, [])
        self._wait_ready(0)
        for index in range(1, self.count):
            self._launch(index, [self.seed(0)])
        for index in range(1, self.count):
            self._wait_ready(index)

    def kill(self, index: int) -> float:
        """kill -9 one node; returns the monotonic time just before the signal."""
        child = self.children[index]
        assert child is not None
        self.kills[index] += 1
        return child.kill()

    def add(self) -> int:
        """Launch one more node (a join), seeded with every running node; returns its index. Call
        ``_wait_ready(index)`` next: until then its node id is unknown."""
        seeds = [self.seed(i) for i, child in enumerate(self.children) if child is not None and child.proc.poll() is None]
        self.ports.append((_free_port(), _free_port()))
        self.children.append(None)
        self.node_ids.append("")
        self.launches.append(0)
        self.kills.append(0)
        self.count += 1
        self._launch(self.count - 1, seeds)
        return self.count - 1

    def restart(self, index: int) -> None:
        self._launch(index, [self.seed(i) for i in range(self.count) if i != index])
        self._wait_ready(index)

    def pids(self) -> dict[str, int]:
        return {f"node{i + 1}": child.pid for i, child in enumerate(self.children)
                if child is not None and child.proc.poll() is None}

    def label(self, node_id: str) -> str:
        """``node2 (id)`` for a node id of this cluster."""
        if node_id in self.node_ids:
            return f"node{self.node_ids.index(node_id) + 1} ({node_id})"
        return str(node_id)

    def stop(self) -> None:
        for child in self.children:
            if child is not None:
                try:
                    child.stop()
                except Exception:  # keep going: every other child must still be stopped
                    pass


def _topic_partitions(status: dict, topic: str) -> list[dict]:
    for entry in status.get("topics", []):
        if entry["name"] == topic:
            return entry["partitions"]
    return []


def _health_problem(status: dict, topic: str, node_ids: list[str], replication_factor: int,
                    need_in_sync: bool, partitions_expected: int = PARTITIONS) -> str | None:
    """Why the cluster is not ready for a measurement on ``topic``, or None when it is."""
    states = {m["node_id"]: m["state"] for m in status.get("members", [])}
    down = [n for n in node_ids if states.get(n) != "alive"]
    if down:
        return "members not alive: " + ", ".join(f"{n} ({states.get(n, 'unknown')})" for n in down)
    partitions = _topic_partitions(status, topic)
    if len(partitions) != partitions_expected:
        return f"status shows {len(partitions)} of {partitions_expected} partitions of {topic}"
    for p in partitions:
        if p["leader"] is None or states.get(p["leader"]) != "alive":
            return f"partition {p['partition']} has no live leader ({p['leader']})"
        if len(p["replicas"]) != replication_factor:
            return f"partition {p['partition']} has {len(p['replicas'])} replicas, not {replication_factor}"
        if need_in_sync and set(p["in_sync"]) != set(p["replicas"]):
            return (f"partition {p['partition']}: in sync {len(p['in_sync'])} of {len(p['replicas'])} replicas "
                    f"({', '.join(p['in_sync'])})")
    return None


def _wait_cluster(client: Any, topic: str, cluster: _Cluster, timeout_s: float,
                  need_in_sync: bool, partitions: int = PARTITIONS) -> tuple[dict | None, str | None]:
    """Poll status until the cluster is ready (see ``_health_problem``); returns (status, None) or (None, why not)."""
    deadline = time.monotonic() + timeout_s
    problem = "no status answer"
    while True:
        try:
            status = client.status(timeout=2.0)
            problem = _health_problem(status, topic, cluster.node_ids, cluster.replication_factor, need_in_sync,
                                      partitions)
            if problem is None:
                return status, None
        except MeshqError as exc:
            problem = f"status failed: {_error_text(exc)}"
        if time.monotonic() >= deadline:
            return None, problem
        time.sleep(0.1)


def _wait_agreed(client: Any, cluster: _Cluster, timeout_s: float) -> None:
    """Wait until the agreed storage membership (the ring) is exactly the cluster's nodes, all alive."""
    deadline = time.monotonic() + timeout_s
    problem = "no status answer"
    expected = set(cluster.node_ids)
    while True:
        try:
            status = client.status(timeout=2.0)
            ring = set(status.get("ring", {}).get("members", []))
            states = {m["node_id"]: m["state"] for m in status.get("members", [])}
            if ring != expected:
                problem = f"ring members {sorted(ring)}, expected {sorted(expected)}"
            elif any(states.get(n) != "alive" for n in expected):
                problem = f"member states {states}"
            else:
                return
        except MeshqError as exc:
            problem = f"status failed: {_error_text(exc)}"
        if time.monotonic() >= deadline:
            raise BenchError(f"the {cluster.count} nodes did not agree on the membership within {timeout_s:.0f} s: "
                             f"{problem}")
        time.sleep(0.1)


def _wait_high_watermarks(client: Any, topic: str, expected: int, timeout_s: float) -> int:
    """The sum of ``topic``'s high watermarks once it reaches ``expected`` (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    stored = -1
    while True:
        try:
            stored = _high_watermarks(client, {topic})
        except MeshqError:
            pass
        if stored >= expected or time.monotonic() >= deadline:
            return stored
        time.sleep(0.1)


def _cluster_phase(client: Any, topic: str, acks: str, args: Any, values: list[bytes],
                   processes: dict[str, int]) -> dict[str, Any]:
    """Pipelined ``produce_batch`` and synchronous ``produce`` at one acks level; a failure is recorded, not raised."""
    out: dict[str, Any] = {"acks": acks, "topic": topic}
    try:
        out["produce_batch"] = _pipelined_batch(client, topic, args.records, values, acks, _CpuSampler(processes))
    except (MeshqError, BenchError, TimeoutError) as exc:
        out["produce_batch"] = {"error": _error_text(exc)}
    if args.sync_records > 0:
        try:
            out["produce"] = _synchronous(client, topic, args.sync_records, values, acks, _CpuSampler(processes))
        except (MeshqError, BenchError, TimeoutError) as exc:
            out["produce"] = {"error": _error_text(exc)}
    parts = [out[k] for k in ("produce_batch", "produce") if k in out]
    if all("error" not in part for part in parts):
        acknowledged = sum(part["acknowledged"] for part in parts)
        stored = _wait_high_watermarks(client, topic, acknowledged, 15.0)
        out["verification"] = {"acknowledged": acknowledged, "high_watermark_sum": stored,
                               "ok": stored == acknowledged}
    return out


class _Writer:
    """Produces one record at a time to one partition until stopped, recording (start, end, error) per call."""

    def __init__(self, client: Any, topic: str, partition: int, value: bytes, acks: str, timeout_s: float,
                 stop: threading.Event) -> None:
        self.client = client
        self.topic = topic
        self.partition = partition
        self.value = value
        self.acks = acks
        self.timeout_s = timeout_s
        self.stop = stop
        self.calls: list[tuple[float, float, str | None]] = []
        self.last_error = ""  # the whole text of the latest failure
        self.thread = threading.Thread(target=self._run, name=f"bench-writer-{partition}", daemon=True)

    def _run(self) -> None:
        clock = time.monotonic
        while not self.stop.is_set():
            started = clock()
            error = None
            try:
                self.client.produce(self.topic, self.value, acks=self.acks, timeout=self.timeout_s,
                                    partition=self.partition)
            except Exception as exc:  # every failure is data here: the outage is what is measured
                error = type(exc).__name__
                self.last_error = _error_text(exc)[:300]
            ended = clock()
            self.calls.append((started, ended, error))
            if error is None or ended - started < FAILOVER_WRITER_PAUSE_S:
                self.stop.wait(FAILOVER_WRITER_PAUSE_S)  # a steady trickle, not a busy loop

    def first_success_after(self, moment: float) -> float | None:
        """End time of the first successful call that started at or after ``moment``."""
        for started, ended, error in list(self.calls):
            if error is None and started >= moment:
                return ended
        return None

    def last_error_before(self, moment: float) -> str | None:
        errors = [error for _s, ended, error in list(self.calls) if error is not None and ended <= moment]
        return errors[-1] if errors else None

    def successes_between(self, begin: float, end: float) -> int:
        return sum(1 for started, ended, error in list(self.calls) if error is None and begin <= ended <= end)

    def errors_between(self, begin: float, end: float) -> collections.Counter:
        return collections.Counter(error for started, ended, error in list(self.calls)
                                   if error is not None and begin < ended <= end)

    def longest_stall(self, begin: float, end: float) -> float:
        """The longest time within [begin, end] without a successful call completing."""
        previous = begin
        longest = 0.0
        for _started, ended, error in list(self.calls):
            if error is None and begin <= ended <= end:
                longest = max(longest, ended - previous)
                previous = ended
        return max(longest, end - previous)


def _probe_with_fresh_client(args: Any, cluster: _Cluster, topic: str, partitions: list[int]) -> dict[str, str]:
    """One write per partition from a new client: tells a stuck producer from a stuck partition."""
    from meshq.node import Node

    outcome: dict[str, str] = {}
    probe = Node(cluster=args.cluster, seeds=[cluster.seed(i) for i, child in enumerate(cluster.children)
                                              if child is not None and child.proc.poll() is None],
                 mdns=False, role="client")
    try:
        probe.start()
        probe.wait_ready(timeout=5.0)
        for p in partitions:
            started = time.monotonic()
            try:
                probe.produce(topic, b"probe", acks=args.failover_acks, timeout=2.0, partition=p)
                outcome[str(p)] = f"ok in {time.monotonic() - started:.3f} s"
            except MeshqError as exc:
                outcome[str(p)] = type(exc).__name__
    except MeshqError as exc:
        outcome["client"] = _error_text(exc)
    finally:
        probe.stop()
    return outcome


def _failover_repeat(client: Any, cluster: _Cluster, topic: str, args: Any, repeat: int,
                     restart_after: bool) -> dict[str, Any]:
    """Kill -9 a partition leader while writers produce to every partition; time until its partitions take writes."""
    status, problem = _wait_cluster(client, topic, cluster, CLUSTER_READY_TIMEOUT_S, need_in_sync=False)
    if status is None:
        return {"repeat": repeat, "error": f"the cluster was not ready before the kill: {problem}"}
    in_sync_status, in_sync_problem = _wait_cluster(client, topic, cluster, args.in_sync_timeout, need_in_sync=True)
    if in_sync_status is not None:
        status = in_sync_status
    leaders = {p["partition"]: p["leader"] for p in _topic_partitions(status, topic)}
    # spread the kills over the nodes: the least killed node that leads something, in rotation
    order = [cluster.node_ids[(repeat + k) % cluster.count] for k in range(cluster.count)]
    candidates = [node_id for node_id in order if node_id in leaders.values()]
    victim = min(candidates, key=lambda n: cluster.kills[cluster.node_ids.index(n)]) if candidates else None
    if victim is None:
        return {"repeat": repeat, "error": f"no node leads a partition of {topic}: {leaders}"}
    victim_index = cluster.node_ids.index(victim)
    victim_partitions = sorted(p for p, leader in leaders.items() if leader == victim)
    other_partitions = sorted(p for p in leaders if p not in victim_partitions)
    result: dict[str, Any] = {
        "repeat": repeat, "victim": victim, "victim_label": cluster.label(victim),
        "victim_was_metadata_leader": status.get("metadata", {}).get("leader") == victim,
        "partitions": victim_partitions, "in_sync_before_kill": in_sync_problem is None,
    }
    if in_sync_problem is not None:
        result["in_sync_problem"] = in_sync_problem
    stop = threading.Event()
    value = os.urandom(args.value_bytes)
    writers = {p: _Writer(client, topic, p, value, args.failover_acks, args.failover_timeout, stop)
               for p in sorted(leaders)}
    for writer in writers.values():
        writer.thread.start()
    killed_at = end = 0.0
    try:
        warm_until = time.monotonic() + FAILOVER_PRE_KILL_S
        while time.monotonic() < warm_until:
            time.sleep(0.02)
        # leadership may have moved meanwhile (a restarted preferred leader takes its partitions back)
        try:
            leaders = {p["partition"]: p["leader"] for p in _topic_partitions(client.status(timeout=2.0), topic)}
        except MeshqError:
            pass
        victim_partitions = sorted(p for p, leader in leaders.items() if leader == victim)
        other_partitions = sorted(p for p in leaders if p not in victim_partitions)
        result["partitions"] = victim_partitions
        if not victim_partitions:
            result["error"] = f"{cluster.label(victim)} no longer leads a partition; nothing was killed"
            return result
        now = time.monotonic()
        idle = [p for p in victim_partitions if writers[p].successes_between(now - FAILOVER_PRE_KILL_S, now) == 0]
        if idle:
            result["error"] = ("writes did not succeed before the kill on partition(s) "
                               + ", ".join(f"{p} (last error {writers[p].last_error_before(now)})" for p in idle)
                               + f" at acks={args.failover_acks}; nothing was killed")
            return result
        killed_at = cluster.kill(victim_index)
        deadline = killed_at + args.failover_deadline
        while time.monotonic() < deadline:
            if all(writers[p].first_success_after(killed_at) is not None for p in victim_partitions):
                break
            time.sleep(0.005)
        end = time.monotonic()
    finally:
        stop.set()
        for writer in writers.values():
            writer.thread.join(args.failover_timeout + 5.0)
    recovery: dict[int, float | None] = {}
    for p in victim_partitions:
        back = writers[p].first_success_after(killed_at)
        recovery[p] = None if back is None else back - killed_at
    recovered = [s for s in recovery.values() if s is not None]
    result["recovery_s"] = {str(p): (None if s is None else round(s, 4)) for p, s in recovery.items()}
    result["first_s"] = min(recovered) if recovered else None
    result["all_s"] = max(recovered) if len(recovered) == len(victim_partitions) else None
    if result["all_s"] is None:
        stuck = [p for p, s in recovery.items() if s is None]
        result["error"] = (f"writes to {len(stuck)} of the killed leader's {len(victim_partitions)} partitions "
                           f"did not succeed within {args.failover_deadline:g} s")
        result["last_errors"] = {str(p): writers[p].last_error for p in stuck}
        result["fresh_client_probe"] = _probe_with_fresh_client(args, cluster, topic, stuck)
        result["error"] += "; a fresh client then got: " + ", ".join(
            f"partition {p}: {outcome}" for p, outcome in result["fresh_client_probe"].items())
        result["error"] += f"; the writers' last error (partition {stuck[0]}): {writers[stuck[0]].last_error}"
    outage_end = killed_at + (result["all_s"] if result["all_s"] is not None else end - killed_at)
    errors: collections.Counter = collections.Counter()
    for p in victim_partitions:
        errors.update(writers[p].errors_between(killed_at, outage_end))
    result["failed_calls"] = dict(errors)
    if other_partitions:
        result["others_longest_stall_s"] = max(writers[p].longest_stall(killed_at, outage_end)
                                               for p in other_partitions)
        others_errors: collections.Counter = collections.Counter()
        for p in other_partitions:
            others_errors.update(writers[p].errors_between(killed_at, outage_end))
        result["others_failed_calls"] = dict(others_errors)
    try:
        after = client.status(timeout=2.0)
        moved = [p for p in _topic_partitions(after, topic) if p["partition"] in victim_partitions]
        result["new_leaders"] = {str(p["partition"]): p["leader"] for p in moved}
        result["in_sync_after"] = {str(p["partition"]): p["in_sync"] for p in moved}
    except MeshqError:
        pass
    if restart_after:
        cluster.restart(victim_index)
    return result


def _run_failover(client: Any, cluster: _Cluster, topic: str, args: Any) -> dict[str, Any]:
    failure_timeout_s = _default_failure_timeout_s()
    out: dict[str, Any] = {"topic": topic, "acks": args.failover_acks, "write_timeout_s": args.failover_timeout,
                           "deadline_s": args.failover_deadline, "failure_timeout_s": failure_timeout_s,
                           "target_s": failure_timeout_s + TARGET_FAILOVER_SLACK_S, "repeats": []}
    for repeat in range(args.failover_repeats):
        _progress(f"failover {repeat + 1} of {args.failover_repeats}")
        try:
            result = _failover_repeat(client, cluster, topic, args, repeat,
                                      restart_after=repeat + 1 < args.failover_repeats)
        except (BenchError, MeshqError) as exc:  # e.g. the killed node did not come back
            out["repeats"].append({"repeat": repeat, "error": _error_text(exc)})
            break
        out["repeats"].append(result)
        if "victim" not in result or "recovery_s" not in result:
            break  # the cluster is not in a state to repeat: the reason is in this repeat's error
    measured = [r["all_s"] for r in out["repeats"] if r.get("all_s") is not None]
    out["recovered"] = len(measured)
    out["median_s"] = statistics.median(measured) if measured else None
    firsts = [r["first_s"] for r in out["repeats"] if r.get("first_s") is not None]
    out["median_first_s"] = statistics.median(firsts) if firsts else None
    return out


def _run_cluster(args: Any, workdir: str) -> dict[str, Any]:
    """The replicated part of ``bench replication``: throughput, latency and failover on ``--nodes`` nodes."""
    from meshq.node import Node

    replication_factor = min(args.replication_factor, args.nodes)
    cluster = _Cluster(args.nodes, workdir, args, replication_factor)
    client: Any = None
    out: dict[str, Any] = {"nodes": args.nodes, "replication_factor": replication_factor, "partitions": PARTITIONS,
                           "fsync": args.fsync}
    try:
        _progress(f"starting {args.nodes} nodes")
        cluster.start()
        out["node_ids"] = list(cluster.node_ids)
        client = Node(cluster=args.cluster, seeds=cluster.seeds, mdns=False, role="client")
        client.start()
        client.wait_ready(timeout=READY_TIMEOUT_S)
        _wait_agreed(client, cluster, CLUSTER_READY_TIMEOUT_S)
        run_id = uuid.uuid4().hex[:8]
        values = _values(args.batch, args.value_bytes)
        out["acks"] = {}
        for acks in ("leader", "quorum"):
            topic = f"bench-{run_id}-rf{replication_factor}-{acks}"
            client.create_topic(topic, partitions=PARTITIONS, replication_factor=replication_factor, retention_ms=None)
            status, problem = _wait_cluster(client, topic, cluster, CLUSTER_READY_TIMEOUT_S, need_in_sync=False)
            if status is None:
                raise BenchError(f"the cluster did not get ready for {topic}: {problem}")
            _status, in_sync_problem = _wait_cluster(client, topic, cluster, args.in_sync_timeout, need_in_sync=True)
            processes = {"producer": os.getpid(), **cluster.pids()}
            _progress(f"{args.nodes} nodes, replication factor {replication_factor}, acks={acks}")
            phase = _cluster_phase(client, topic, acks, args, values, processes)
            phase["in_sync_before"] = in_sync_problem is None
            if in_sync_problem is not None:
                phase["in_sync_problem"] = in_sync_problem
            out["acks"][acks] = phase
        if args.failover_repeats > 0:
            topic = f"bench-{run_id}-failover"
            client.create_topic(topic, partitions=PARTITIONS, replication_factor=replication_factor, retention_ms=None)
            out["failover"] = _run_failover(client, cluster, topic, args)
        return out
    except (BenchError, MeshqError) as exc:  # keep what was measured before the failure
        out["error"] = _error_text(exc)
        return out
    finally:
        out["node_pids"] = cluster.launched_pids
        try:
            if client is not None:
                client.stop()
        finally:
            cluster.stop()


# ---------------------------------------------------------------------- rebalancing (``bench rebalance``)
def _dir_bytes(path: str) -> int:
    """Apparent size of every file under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # deleted meanwhile (a dropped replica, a rolled segment)
                pass
    return total


def _placement(status: dict, topic: str) -> dict[int, dict]:
    """Per partition of ``topic``: replicas, leader, learners, target as ``status`` shows them."""
    return {p["partition"]: {"replicas": list(p["replicas"]), "leader": p["leader"],
                             "learners": list(p.get("learners", [])), "target": list(p.get("target", p["replicas"]))}
            for p in _topic_partitions(status, topic)}


class _LoadWriter:
    """A producer thread running through the moves: ``produce_batch`` of ``len(values)`` records at
    ``acks``, at most ``LOAD_WINDOW`` batches in flight, paced to ``rate`` records/s (None: as fast
    as acknowledgements come back). Each batch's (submitted, acknowledged or failed, records, error)
    is recorded from its Future's callback, so any time window can be summarised afterwards."""

    def __init__(self, client: Any, topic: str, values: list[bytes], acks: str, rate: int | None) -> None:
        self.client = client
        self.topic = topic
        self.values = values
        self.acks = acks
        self.rate = rate
        self.batches: list[tuple[float, float, int, str | None]] = []
        self.stop_event = threading.Event()
        self._slots = threading.Semaphore(LOAD_WINDOW)
        self.thread = threading.Thread(target=self._run, name="bench-load-writer", daemon=True)
        self.error: str | None = None  # why the writer stopped early, if it did

    def start(self) -> None:
        self.thread.start()

    def _done(self, future: Future, submitted: float) -> None:
        exc = future.exception()
        self.batches.append((submitted, time.monotonic(), len(self.values), None if exc is None else type(exc).__name__))
        self._slots.release()

    def _run(self) -> None:
        interval = len(self.values) / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if not self._slots.acquire(timeout=0.1):
                    continue
                if interval:
                    now = time.monotonic()
                    if next_at > now and self.stop_event.wait(next_at - now):
                        self._slots.release()
                        break
                    next_at = max(next_at + interval, time.monotonic() - interval)  # no burst after a stall
                submitted = time.monotonic()
                try:
                    future = self.client.produce_batch(self.topic, self.values, acks=self.acks,
                                                       timeout=LOAD_TIMEOUT_S)
                except Exception:
                    self._slots.release()
                    raise
                future.add_done_callback(lambda f, s=submitted: self._done(f, s))
        except Exception as exc:  # e.g. the client stopped under us: say so in the report
            self.error = _error_text(exc)

    def stop(self) -> None:
        """Stop submitting and wait (bounded) for the batches in flight."""
        self.stop_event.set()
        self.thread.join(LOAD_TIMEOUT_S + 5.0)
        for _ in range(LOAD_WINDOW):
            self._slots.acquire(timeout=LOAD_TIMEOUT_S + 5.0)

    def totals(self) -> tuple[int, int]:
        """(records acknowledged, records of failed batches: stored or not, nobody knows)."""
        batches = list(self.batches)
        return (sum(n for _s, _e, n, error in batches if error is None),
                sum(n for _s, _e, n, error in batches if error is not None))

    def window(self, begin: float, end: float) -> dict[str, Any]:
        """Throughput (batches acknowledged within [begin, end]) and latency (batches submitted in it)."""
        batches = list(self.batches)
        seconds = max(end - begin, 1e-9)
        acked = [(s, e, n) for s, e, n, error in batches if error is None and begin <= e <= end]
        latencies = [int((e - s) * 1e9) for s, e, _n, error in batches if error is None and begin <= s < end]
        failed = collections.Counter(error for _s, e, _n, error in batches if error is not None and begin <= e <= end)
        previous, stall = begin, 0.0
        for _s, e, _n in sorted(acked, key=lambda b: b[1]):
            stall, previous = max(stall, e - previous), e
        out: dict[str, Any] = {"seconds": round(end - begin, 3), "records": sum(n for _s, _e, n in acked),
                               "records_per_s": sum(n for _s, _e, n in acked) / seconds,
                               "failed_batches": dict(failed), "longest_stall_s": round(max(stall, end - previous), 3)}
        if latencies:
            out["batch_latency"] = _percentiles_us(latencies)
        return out


def _rebalance_problem(status: dict, topic: str, node_ids: list[str], replication_factor: int, partitions: int,
                       expected: dict[int, list[str]]) -> str | None:
    """Why the move to ``node_ids`` is not finished, or None: the ring is exactly ``node_ids``, the cluster
    reports no handoff, every replica set is the ring's (``expected``) and every replica is in sync."""
    ring = set(status.get("ring", {}).get("members", []))
    if ring != set(node_ids):
        return f"ring members {sorted(ring)}, expected {sorted(node_ids)}"
    handoffs = status.get("handoffs")
    if handoffs is None:
        return "status has no handoffs count"
    if handoffs:
        return f"{handoffs} handoff(s) in progress"
    placement = _placement(status, topic)
    for p, want in sorted(expected.items()):
        have = placement.get(p, {}).get("replicas", [])
        if set(have) != set(want):
            return f"partition {p}: replicas {have}, the ring places it on {want}"
    return _health_problem(status, topic, node_ids, replication_factor, need_in_sync=True,
                           partitions_expected=partitions)


def _wait_rebalanced(client: Any, topic: str, node_ids: list[str], replication_factor: int, partitions: int,
                     expected: dict[int, list[str]], t0: float, timeout_s: float) -> dict[str, Any]:
    """Poll status from ``t0`` until ``_rebalance_problem`` says the move is done.

    Returns ``done_s`` (None on timeout, with ``problem``), ``ring_s`` (first status whose ring is
    ``node_ids``), ``first_handoff_s`` / ``max_handoffs`` and the last status seen."""
    out: dict[str, Any] = {"done_s": None, "ring_s": None, "first_handoff_s": None, "max_handoffs": 0,
                           "status_polls": 0, "status_failures": 0}
    deadline = t0 + timeout_s
    problem = "no status answer"
    while True:
        try:
            status = client.status(timeout=2.0)
        except MeshqError as exc:
            out["status_failures"] += 1
            problem = f"status failed: {_error_text(exc)}"
        else:
            now = time.monotonic() - t0
            out["status_polls"] += 1
            out["status"] = status
            if out["ring_s"] is None and set(status.get("ring", {}).get("members", [])) == set(node_ids):
                out["ring_s"] = now
            handoffs = status.get("handoffs") or 0
            if handoffs and out["first_handoff_s"] is None:
                out["first_handoff_s"] = now
            out["max_handoffs"] = max(out["max_handoffs"], handoffs)
            problem = _rebalance_problem(status, topic, node_ids, replication_factor, partitions, expected)
            if problem is None:
                out["done_s"] = now
                return out
        if time.monotonic() >= deadline:
            out["problem"] = problem
            return out
        time.sleep(REBALANCE_POLL_S)


def _node_bytes(cluster: _Cluster) -> dict[str, int]:
    """Bytes in every node's data directory, by label (``node1``...), including stopped nodes' (0 once deleted)."""
    return {f"node{i + 1}": _dir_bytes(cluster.data_dir(i)) for i in range(cluster.count)}


def _partition_bytes(cluster: _Cluster, topic: str, partitions: int) -> dict[int, int]:
    """Per partition of ``topic``, the size of its largest copy on any node (``<data>/topics/<topic>-<p>/``)."""
    return {p: max(_dir_bytes(os.path.join(cluster.data_dir(i), "topics", f"{topic}-{p}")) for i in range(cluster.count))
            for p in range(partitions)}


def _move_start(cluster: _Cluster, client: Any, topic: str, partitions: int) -> dict[str, Any]:
    """What a move is compared with: placement, node and partition sizes just before it starts."""
    status = client.status(timeout=5.0)
    return {"status": status, "placement": _placement(status, topic), "members": [n for n in cluster.node_ids if n],
            "node_bytes": _node_bytes(cluster), "partition_bytes": _partition_bytes(cluster, topic, partitions)}


def _move_report(out: dict[str, Any], start: dict[str, Any], cluster: _Cluster, topic: str, partitions: int,
                 replication_factor: int, members_after: list[str], waited: dict[str, Any], vnodes: int,
                 receivers: list[str]) -> None:
    """Add to ``out`` what a join or a leave moved, against the ring's prediction for the same membership change.

    ``moved_bytes``: the size, when the move started, of the partitions whose replica set changed
    (each got exactly one new replica); ``received_bytes``: what the ``receivers`` nodes' data
    directories grew by, which also counts records written meanwhile (``--load-rate``)."""
    from meshq.core.ring import HashRing, moved_partitions

    out.update({k: waited[k] for k in ("done_s", "ring_s", "first_handoff_s", "max_handoffs", "status_polls",
                                       "status_failures")})
    before, members_before = start["placement"], start["members"]
    ring_after = HashRing(members_after, vnodes)
    out["members_before"], out["members_after"] = members_before, members_after
    out["predicted_moved"] = moved_partitions(HashRing(members_before, vnodes), ring_after, topic, partitions,
                                              replication_factor)
    after = _placement(waited.get("status", {}), topic)
    out["moved"] = sorted(p for p in after if set(after[p]["replicas"]) != set(before.get(p, {}).get("replicas", [])))
    out["moved_as_predicted"] = out["moved"] == out["predicted_moved"]
    placement = ring_after.placement(topic, partitions, replication_factor)
    out["replicas_in_ring_order"] = sum(1 for p, want in enumerate(placement) if after.get(p, {}).get("replicas") == want)
    out["leaders_at_ring_owner"] = sum(1 for p, want in enumerate(placement) if after.get(p, {}).get("leader") == want[0])
    out["leaders_moved"] = sum(1 for p in after if after[p]["leader"] != before.get(p, {}).get("leader"))
    out["final_placement"] = {str(p): after[p]["replicas"] for p in sorted(after)}
    out["bytes_before"] = start["node_bytes"]
    out["bytes_after"] = _node_bytes(cluster)
    out["moved_bytes"] = sum(start["partition_bytes"].get(p, 0) for p in out["moved"])
    out["received_bytes"] = sum(max(0, out["bytes_after"][label] - start["node_bytes"].get(label, 0))
                                for label in receivers)
    if out["done_s"]:
        out["moved_mb_per_s"] = out["moved_bytes"] / 1e6 / out["done_s"]


def _rebalance_join(client: Any, cluster: _Cluster, topic: str, args: Any, partitions: int,
                    replication_factor: int, vnodes: int) -> dict[str, Any]:
    """Start one more node and time until every partition is where the ring over the bigger membership puts it."""
    from meshq.core.ring import HashRing

    start = _move_start(cluster, client, topic, partitions)
    t0 = time.monotonic()
    index = cluster.add()
    sampler = _CpuSampler({"producer": os.getpid(), **cluster.pids()})
    sampler.start()
    out: dict[str, Any] = {"move": "join", "node": f"node{index + 1}", "t0": t0}
    try:
        cluster._wait_ready(index)
        out["ready_s"] = time.monotonic() - t0
        members_after = start["members"] + [cluster.node_ids[index]]
        out["node_id"] = cluster.node_ids[index]
        expected = dict(enumerate(HashRing(members_after, vnodes).placement(topic, partitions, replication_factor)))
        waited = _wait_rebalanced(client, topic, members_after, replication_factor, partitions, expected, t0,
                                  args.move_timeout)
    finally:
        sampler.stop()
    out["cpu"] = sampler.summary()
    _move_report(out, start, cluster, topic, partitions, replication_factor, members_after, waited, vnodes,
                 receivers=[out["node"]])
    if waited["done_s"] is None:
        out["error"] = (f"the join did not finish within {args.move_timeout:g} s: {waited.get('problem')}"
                        + _node_tails(cluster))
    return out


def _rebalance_leave(client: Any, cluster: _Cluster, topic: str, args: Any, partitions: int,
                     replication_factor: int, vnodes: int) -> dict[str, Any]:
    """``leave`` of one original node that does not lead the metadata log; time until the rest hold everything."""
    from meshq.core.ring import HashRing

    start = _move_start(cluster, client, topic, partitions)
    metadata_leader = start["status"].get("metadata", {}).get("leader")
    candidates = [i for i in range(cluster.count - 1) if cluster.node_ids[i] != metadata_leader]
    index = candidates[0] if candidates else 0
    victim = cluster.node_ids[index]
    child = cluster.children[index]
    assert child is not None
    members_after = [n for n in start["members"] if n != victim]
    expected = dict(enumerate(HashRing(members_after, vnodes).placement(topic, partitions, replication_factor)))
    sampler = _CpuSampler({"producer": os.getpid(), **cluster.pids()})
    t0 = time.monotonic()
    out: dict[str, Any] = {"move": "leave", "node": f"node{index + 1}", "node_id": victim,
                           "was_metadata_leader": victim == metadata_leader, "t0": t0}

    def leave() -> None:  # in a thread: meanwhile status is polled as for a join
        try:
            client.leave(timeout=args.move_timeout, node_id=victim)
            out["leave_returned_s"] = time.monotonic() - t0
        except MeshqError as exc:
            out["leave_error"] = _error_text(exc)

    leaver = threading.Thread(target=leave, name="bench-leave", daemon=True)
    sampler.start()
    leaver.start()
    try:
        waited = _wait_rebalanced(client, topic, members_after, replication_factor, partitions, expected, t0,
                                  args.move_timeout)
        leaver.join(max(1.0, t0 + args.move_timeout - time.monotonic()))
        try:
            child.proc.wait(max(1.0, t0 + args.move_timeout - time.monotonic()))
            out["process_exit_s"] = time.monotonic() - t0
            out["process_exit_code"] = child.proc.returncode
        except subprocess.TimeoutExpired:
            out["process_exit_s"] = None
    finally:
        sampler.stop()
    out["cpu"] = sampler.summary()
    _move_report(out, start, cluster, topic, partitions, replication_factor, members_after, waited, vnodes,
                 receivers=[f"node{i + 1}" for i in range(cluster.count) if i != index])
    problems = []
    if "leave_error" in out:
        problems.append(f"leave failed: {out['leave_error']}")
    if waited["done_s"] is None:
        problems.append(f"the leave did not finish within {args.move_timeout:g} s: {waited.get('problem')}")
    elif out.get("process_exit_s") is None:
        problems.append(f"the leaving node (pid {child.pid}) did not exit by itself")
    if problems:
        out["error"] = "; ".join(problems) + _node_tails(cluster)
    return out


def _node_tails(cluster: _Cluster) -> str:
    """The end of every node's stderr, for an error that needs the nodes' side of the story."""
    return "".join(f"\nnode{i + 1} ({cluster.node_ids[i] or 'no id'}, pid {child.pid}){child._tail()}"
                   for i, child in enumerate(cluster.children) if child is not None)


def _run_rebalance_cluster(args: Any, workdir: str, load_rate: int | None, with_load: bool) -> dict[str, Any]:
    """Preload ``--nodes`` nodes, then a join (and a leave, if this meshq has one), optionally under load."""
    from meshq.node import Node

    partitions = REBALANCE_PARTITIONS
    replication_factor = min(args.replication_factor, args.nodes)
    cluster = _Cluster(args.nodes, workdir, args, replication_factor)
    client: Any = None
    writer: _LoadWriter | None = None
    out: dict[str, Any] = {"nodes": args.nodes, "replication_factor": replication_factor, "partitions": partitions,
                           "fsync": args.fsync}
    try:
        _progress(f"starting {args.nodes} nodes")
        cluster.start()
        out["node_ids"] = list(cluster.node_ids)
        client = Node(cluster=args.cluster, seeds=cluster.seeds, mdns=False, role="client")
        client.start()
        client.wait_ready(timeout=READY_TIMEOUT_S)
        _wait_agreed(client, cluster, CLUSTER_READY_TIMEOUT_S)
        topic = f"bench-{uuid.uuid4().hex[:8]}-rebalance"
        out["topic"] = topic
        client.create_topic(topic, partitions=partitions, replication_factor=replication_factor, retention_ms=None)
        status, problem = _wait_cluster(client, topic, cluster, CLUSTER_READY_TIMEOUT_S, False, partitions)
        if status is None:
            raise BenchError(f"the cluster did not get ready for {topic}: {problem}")
        vnodes = status.get("ring", {}).get("vnodes") or 256
        values = _values(args.batch, args.value_bytes)

        _progress(f"preloading {args.records:,} records (acks=quorum)")
        preload = _pipelined_batch(client, topic, args.records, values, "quorum",
                                   _CpuSampler({"producer": os.getpid(), **cluster.pids()}), repeats=1,
                                   limit_s=max(PHASE_TIMEOUT_S, args.records / 10_000))
        out["preload"] = preload
        acknowledged = preload["acknowledged"]
        stored = _wait_high_watermarks(client, topic, acknowledged, 30.0)
        status, problem = _wait_cluster(client, topic, cluster, args.move_timeout, True, partitions)
        if status is None:
            raise BenchError(f"the replicas did not get in sync after the preload: {problem}")
        out["preload"]["high_watermark_sum"] = stored
        out["bytes_after_preload"] = _node_bytes(cluster)

        if with_load:
            writer = _LoadWriter(client, topic, values[:LOAD_BATCH], "quorum", load_rate)
            writer.start()
            time.sleep(LOAD_BEFORE_S)
        _progress(f"join: starting node{cluster.count + 1}")
        join = _rebalance_join(client, cluster, topic, args, partitions, replication_factor, vnodes)
        out["join"] = join
        if writer is not None:
            join["load_before"] = writer.window(join["t0"] - LOAD_BEFORE_S, join["t0"])
            join["load_during"] = writer.window(join["t0"], join["t0"] + (join["done_s"] or 0.0))
        del join["t0"]
        if "error" in join:
            return out

        if args.skip_leave:
            out["leave"] = {"skipped": "--skip-leave"}
        elif not callable(getattr(client, "leave", None)):
            out["leave"] = {"skipped": "this meshq has no leave (Node.leave / meshq leave)"}
        else:
            time.sleep(LOAD_BEFORE_S if writer is not None else 1.0)  # leadership settles on the ring owners
            _progress("leave: one of the original nodes leaves")
            leave = _rebalance_leave(client, cluster, topic, args, partitions, replication_factor, vnodes)
            out["leave"] = leave
            if writer is not None:
                leave["load_before"] = writer.window(leave["t0"] - LOAD_BEFORE_S, leave["t0"])
                leave["load_during"] = writer.window(leave["t0"], leave["t0"] + (leave["done_s"] or 0.0))
            del leave["t0"]

        if writer is not None:
            writer.stop()
            load_acknowledged, load_unknown = writer.totals()
            out["load"] = {"rate": load_rate, "acks": "quorum", "batch": len(writer.values), "window_batches": LOAD_WINDOW,
                           "acknowledged": load_acknowledged, "failed_records": load_unknown,
                           "error": writer.error}
            writer = None
        else:
            load_acknowledged = load_unknown = 0
        expected_records = acknowledged + load_acknowledged
        stored = _wait_high_watermarks(client, topic, expected_records, 30.0)
        out["verification"] = {"acknowledged": expected_records, "unknown_fate": load_unknown,
                               "high_watermark_sum": stored,
                               "ok": expected_records <= stored <= expected_records + load_unknown}
        return out
    except (BenchError, MeshqError) as exc:  # keep what was measured before the failure
        out["error"] = _error_text(exc)
        return out
    finally:
        out["node_pids"] = cluster.launched_pids
        try:
            if writer is not None:
                writer.stop()
        finally:
            try:
                if client is not None:
                    client.stop()
            finally:
                cluster.stop()



# ---------------------------------------------------------------------- output
def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _runs_text(row: dict) -> str:
    """Every timed run's rate, e.g. ``1.62M / 1.31M / 1.42M``."""
    return " / ".join(f"{r / 1e6:.2f}M" for r in row.get("runs_records_per_s", [])) or "1 run"


def _wide_console(scenario: str, machine: dict[str, Any]) -> Any:
    """A rich console at least 160 columns wide — the terminal's width on a wide terminal, else 160
    (the replication and rebalance tables need it; a pipe gets 160 too) — that has printed the
    scenario's machine line."""
    from rich.console import Console

    wide = sys.stdout.isatty() and shutil.get_terminal_size().columns >= 160
    console = Console(width=None if wide else 160)
    _print_machine(console, scenario, machine)
    return console


def _print_machine(console: Any, scenario: str, machine: dict[str, Any]) -> None:
    console.print(f"[bold]meshq bench {scenario}[/bold]  {machine['nproc']} CPU x {machine['cpu']}, Python "
                  f"{machine['python']}, pyzmq {machine['pyzmq']} / libzmq {machine['libzmq']}, msgpack "
                  f"{machine['msgpack']}")


def _print_cpu(console: Any, rows: list[tuple[str, dict]]) -> None:
    """The CPU table of the timed runs (``rows``: label, phase result with an optional ``cpu``)."""
    from rich.table import Table

    cpu = Table(title="CPU during the timed runs (% of one core; threads >= 1 %)")
    cpu.add_column("run")
    cpu.add_column("ours", justify="right")
    cpu.add_column("other procs", justify="right")
    cpu.add_column("process: thread cpu%")
    for label, row in rows:
        info = row.get("cpu")
        if info:
            cpu.add_row(label, f"{info.get('ours_percent', 0):.0f}", f"{info.get('other_percent', 0):.0f}",
                        ", ".join(f"{t['process']}: {t['thread']} {t['cpu_percent']:.0f}" for t in info["threads"]))
    console.print(cpu)


def _print_load_warning(console: Any, report: dict[str, Any]) -> None:
    idle = report.get("machine_load_before_cores")
    if idle is not None and idle > 0.2:
        console.print(f"[yellow]warning: other processes used {idle:.2f} cores just before the run "
                      f"(see 'other procs' above); on a {report['machine']['nproc']}-core machine the figures "
                      "are pessimistic[/yellow]")


def _render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    c = report["config"]
    _print_machine(console, "produce", report["machine"])
    console.print(f"records={c['records']:,} sync_records={c['sync_records']:,} value_bytes={c['value_bytes']} "
                  f"batch={c['batch']} acks={c['acks']} fsync={c['fsync']}")
    base = report["baseline"]
    mq = report["meshq"]
    table = Table(title=f"Throughput, pipelined (median of {base['repeats']} baseline and {mq['produce_batch']['repeats']} "
                        "produce_batch timed runs)")
    table.add_column("run")
    table.add_column("records", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("records/s", justify="right")
    table.add_column("MB/s (values)", justify="right")
    table.add_column("vs baseline", justify="right")
    table.add_column("all runs", justify="right")
    table.add_row(f"baseline: pyzmq DEALER->ROUTER, window {base['window_frames']}",
                  f"{base['records']:,}", f"{base['seconds']:.3f}", _fmt_rate(base["records_per_s"]),
                  f"{base['mb_per_s']:.1f}", "100%", _runs_text(base))
    for key, label in (("produce_batch", f"meshq produce_batch, window {BATCH_WINDOW}"),
                       ("produce_async", "meshq produce_async + flush")):
        row = mq[key]
        table.add_row(label, f"{row['records']:,}", f"{row['seconds']:.3f}", _fmt_rate(row["records_per_s"]),
                      f"{row['mb_per_s']:.1f}", f"{row['records_per_s'] / base['records_per_s']:.1%}",
                      _runs_text(row))
    console.print(table)
    _print_cpu(console, [("baseline", base), ("produce_batch", mq["produce_batch"]),
                         ("produce_async", mq["produce_async"]), ("produce (sync)", mq.get("produce", {}))])
    _print_load_warning(console, report)
    lat = Table(title="Synchronous latency (one record per call, µs)")
    for name in ("run", "calls", "p50", "p90", "p99", "max", "mean"):
        lat.add_column(name, justify="right" if name != "run" else "left")
    if "sync" in base:
        s = base["sync"]
        lat.add_row("baseline: raw pyzmq round trip", f"{s['count']:,}", f"{s['p50_us']:.1f}", f"{s['p90_us']:.1f}",
                    f"{s['p99_us']:.1f}", f"{s['max_us']:.1f}", f"{s['mean_us']:.1f}")
    if "produce" in mq and "p50_us" in mq["produce"]:
        s = mq["produce"]
        lat.add_row(f"meshq produce(acks={c['acks']})", f"{s['count']:,}", f"{s['p50_us']:.1f}",
                    f"{s['p90_us']:.1f}", f"{s['p99_us']:.1f}", f"{s['max_us']:.1f}", f"{s['mean_us']:.1f}")
    console.print(lat)
    targets = Table(title="Targets")
    targets.add_column("target")
    targets.add_column("measured", justify="right")
    targets.add_column("met")
    for t in report["targets"]:
        targets.add_row(t["name"], t["measured"], "[green]yes[/green]" if t["met"] else "[red]no[/red]")
    console.print(targets)
    v = mq["verification"]
    colour = "green" if v["ok"] else "red"
    console.print(f"[{colour}]verification: node high watermarks sum {v['high_watermark_sum']:,}, "
                  f"acknowledged {v['acknowledged']:,} -> {'OK' if v['ok'] else 'MISMATCH'}[/{colour}]")


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    base = report["baseline"]
    mq = report["meshq"]
    rps = mq["produce_batch"]["records_per_s"]
    ratio = rps / base["records_per_s"]
    out = [
        {"name": f"pipelined >= {TARGET_PIPELINED_RPS:,} records/s", "measured": f"{rps:,.0f}",
         "met": rps >= TARGET_PIPELINED_RPS, "value": rps},
        {"name": f"pipelined >= {TARGET_BASELINE_RATIO:.0%} of baseline", "measured": f"{ratio:.1%}",
         "met": ratio >= TARGET_BASELINE_RATIO, "value": ratio},
    ]
    if "produce" in mq and "p50_us" in mq["produce"]:
        p50 = mq["produce"]["p50_us"]
        out.append({"name": f"synchronous p50 <= {TARGET_SYNC_P50_US:.0f} µs", "measured": f"{p50:.1f} µs",
                    "met": p50 <= TARGET_SYNC_P50_US, "value": p50})
    return out


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("PASS" if met else "MISS")


def _short(error: str | None) -> str:
    """The exception name of an ``_error_text`` (the whole text is in the report's errors)."""
    return "not run" if error is None else error.split(":", 1)[0]


def _replication_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    quorum = report.get("cluster", {}).get("acks", {}).get("quorum", {})
    batch = quorum.get("produce_batch", {})
    sync = quorum.get("produce", {})
    out = []
    rps = batch.get("records_per_s")
    out.append({"name": f"pipelined acks=quorum >= {TARGET_QUORUM_PIPELINED_RPS:,} records/s",
                "measured": f"{rps:,.0f}" if rps is not None else f"not measured ({_short(batch.get('error'))})",
                "met": None if rps is None else rps >= TARGET_QUORUM_PIPELINED_RPS, "value": rps})
    p50 = sync.get("p50_us")
    out.append({"name": f"synchronous acks=quorum p50 <= {TARGET_QUORUM_SYNC_P50_US:.0f} µs",
                "measured": f"{p50:.1f} µs" if p50 is not None else f"not measured ({_short(sync.get('error'))})",
                "met": None if p50 is None else p50 <= TARGET_QUORUM_SYNC_P50_US, "value": p50})
    failover = report.get("cluster", {}).get("failover")
    if failover is not None:
        median = failover.get("median_s")
        repeats = len(failover["repeats"])
        if median is None:
            measured = "not measured (see errors)"
            met = None
        else:
            measured = f"{median:.2f} s (median; {failover['recovered']} of {repeats} repeats recovered)"
            met = median <= failover["target_s"] and failover["recovered"] == repeats
        out.append({"name": f"failover <= failure_timeout_s + {TARGET_FAILOVER_SLACK_S:.0f} s "
                            f"= {failover['target_s']:.1f} s", "measured": measured, "met": met, "value": median})
    return out


def _replication_errors(report: dict[str, Any]) -> list[str]:
    """Every part of the run that could not be measured or failed its check, one line each."""
    errors: list[str] = []
    single = report.get("single_node", {})
    if single and not single.get("verification", {}).get("ok", False):
        errors.append(f"single node: stored {single['verification']['high_watermark_sum']} records, "
                      f"acknowledged {single['verification']['acknowledged']}")
    cluster = report.get("cluster", {})
    if "error" in cluster:
        errors.append(f"cluster: {cluster['error']}")
    for acks, phase in cluster.get("acks", {}).items():
        for key in ("produce_batch", "produce"):
            if "error" in phase.get(key, {}):
                errors.append(f"{cluster['nodes']} nodes, acks={acks}, {key}: {phase[key]['error']}")
        verification = phase.get("verification")
        if verification is not None and not verification["ok"]:
            errors.append(f"{cluster['nodes']} nodes, acks={acks}: high watermarks sum "
                          f"{verification['high_watermark_sum']}, acknowledged {verification['acknowledged']}")
    for repeat in cluster.get("failover", {}).get("repeats", []):
        if "error" in repeat:
            errors.append(f"failover repeat {repeat['repeat'] + 1}: {repeat['error']}")
    return errors


def _render_replication(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = _wide_console("replication", report["machine"])
    c = report["config"]
    console.print(f"records={c['records']:,} sync_records={c['sync_records']:,} value_bytes={c['value_bytes']} "
                  f"batch={c['batch']} fsync={c['fsync']} nodes={c['nodes']} replication_factor="
                  f"{c['replication_factor']} partitions={PARTITIONS} failover_repeats={c['failover_repeats']}")
    base = report["baseline"]
    single = report.get("single_node", {})
    cluster = report.get("cluster", {})
    table = Table(title=f"Produce, {c['value_bytes']}-byte values: pipelined (median of timed runs) and synchronous")
    for name, right in (("setup", False), ("pipelined records/s", True), ("all runs", True), ("vs baseline", True),
                        ("sync p50 µs", True), ("sync p99 µs", True), ("sync calls", True)):
        table.add_column(name, justify="right" if right else "left")

    def add(label: str, batch: dict, sync: dict | None) -> None:
        if "error" in batch:
            cells = [f"[red]{batch['error'].split(':')[0]}[/red]", "", ""]
        elif batch:
            cells = [_fmt_rate(batch["records_per_s"]), _runs_text(batch),
                     f"{batch['records_per_s'] / base['records_per_s']:.1%}"]
        else:
            cells = ["", "", ""]
        if sync is None or not sync:
            cells += ["", "", ""]
        elif "error" in sync:
            cells += [f"[red]{sync['error'].split(':')[0]}[/red]", "", ""]
        elif "p50_us" in sync:
            cells += [f"{sync['p50_us']:.1f}", f"{sync['p99_us']:.1f}", f"{sync['count']:,}"]
        else:
            cells += ["", "", ""]
        table.add_row(label, *cells)

    add(f"raw pyzmq DEALER->ROUTER (baseline), window {base['window_frames']}", base, base.get("sync"))
    if single:
        add("meshq, 1 node, replication factor 1, acks=leader", single["produce_batch"], single.get("produce"))
    for acks, phase in cluster.get("acks", {}).items():
        add(f"meshq, {cluster['nodes']} nodes, replication factor {cluster['replication_factor']}, acks={acks}",
            phase.get("produce_batch", {}), phase.get("produce"))
    console.print(table)

    rows = [("baseline", base), ("1 node produce_batch", single.get("produce_batch", {})),
            ("1 node produce (sync)", single.get("produce", {}))]
    for acks, phase in cluster.get("acks", {}).items():
        rows += [(f"{cluster['nodes']} nodes {acks} produce_batch", phase.get("produce_batch", {})),
                 (f"{cluster['nodes']} nodes {acks} produce (sync)", phase.get("produce", {}))]
    _print_cpu(console, rows)
    _print_load_warning(console, report)

    failover = cluster.get("failover")
    if failover is not None:
        ft = Table(title=f"Failover: kill -9 of a partition leader -> writes to its partitions succeed again "
                         f"(acks={failover['acks']}, write timeout {failover['write_timeout_s']} s, "
                         f"failure_timeout_s {failover['failure_timeout_s']})")
        for name in ("repeat", "killed", "its partitions", "first back s", "all back s", "per partition s",
                     "failed calls (outage)", "other partitions: longest stall s", "new leaders"):
            ft.add_column(name, justify="left" if name in ("killed", "its partitions", "per partition s",
                                                           "failed calls (outage)", "new leaders") else "right")
        for r in failover["repeats"]:
            if "recovery_s" not in r:
                ft.add_row(str(r["repeat"] + 1), r.get("victim_label", ""),
                           ",".join(str(p) for p in r.get("partitions", [])), "",
                           "[red]not measured[/red]", "", "[red]see the errors below[/red]", "", "")
                continue
            killed = r["victim_label"] + (" [metadata leader]" if r["victim_was_metadata_leader"] else "")
            if not r["in_sync_before_kill"]:
                killed += " [yellow][replicas not all in sync before the kill][/yellow]"
            ft.add_row(str(r["repeat"] + 1), killed, ",".join(str(p) for p in r["partitions"]),
                       "-" if r["first_s"] is None else f"{r['first_s']:.3f}",
                       "[red]not back[/red]" if r["all_s"] is None else f"{r['all_s']:.3f}",
                       " ".join(f"{p}:{'-' if s is None else f'{s:.2f}'}" for p, s in r["recovery_s"].items()),
                       ", ".join(f"{k} {v}" for k, v in sorted(r["failed_calls"].items())) or "none",
                       "" if "others_longest_stall_s" not in r else f"{r['others_longest_stall_s']:.3f}",
                       ", ".join(f"{p}:{_cluster_label(cluster, n)}" for p, n in r.get("new_leaders", {}).items()))
        console.print(ft)
        if failover["median_s"] is not None:
            console.print(f"failover, all partitions of the killed leader back: median {failover['median_s']:.3f} s "
                          f"over {failover['recovered']} repeat(s); first partition back: median "
                          f"{failover['median_first_s']:.3f} s")

    targets = Table(title="Targets (issue 5)")
    targets.add_column("target")
    targets.add_column("measured", justify="right")
    targets.add_column("result")
    colours = {"PASS": "green", "MISS": "red", "n/a": "yellow"}
    for t in report["targets"]:
        verdict = _verdict(t["met"])
        targets.add_row(t["name"], t["measured"], f"[{colours[verdict]}]{verdict}[/{colours[verdict]}]")
    console.print(targets)
    if single:
        v = single["verification"]
        console.print(f"verification, 1 node: high watermarks sum {v['high_watermark_sum']:,}, acknowledged "
                      f"{v['acknowledged']:,} -> {'OK' if v['ok'] else 'MISMATCH'}")
    for acks, phase in cluster.get("acks", {}).items():
        v = phase.get("verification")
        if v is not None:
            console.print(f"verification, {cluster['nodes']} nodes acks={acks}: high watermarks sum "
                          f"{v['high_watermark_sum']:,}, acknowledged {v['acknowledged']:,} -> "
                          f"{'OK' if v['ok'] else 'MISMATCH'}")
        if not phase.get("in_sync_before", True):
            console.print(f"[yellow]note, acks={acks}: not every replica was in sync when the run started "
                          f"({phase.get('in_sync_problem')})[/yellow]")
    for error in report["errors"]:
        console.print(f"[red]not measured / failed: {error}[/red]")


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:,.1f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rebalance_errors(report: dict[str, Any]) -> list[str]:
    """Every part of ``bench rebalance`` that could not be measured or failed its check, one line each."""
    cluster = report.get("cluster", {})
    errors = [f"cluster: {cluster['error']}"] if "error" in cluster else []
    for name in ("join", "leave"):
        move = cluster.get(name, {})
        if "error" in move:
            errors.append(f"{name}: {move['error']}")
        if move.get("done_s") is not None and not move.get("moved_as_predicted", True):
            errors.append(f"{name}: partitions {move['moved']} changed replica set, the ring predicts "
                          f"{move['predicted_moved']}")
    if (cluster.get("load") or {}).get("error"):
        errors.append(f"the producer during the moves stopped: {cluster['load']['error']}")
    verification = cluster.get("verification")
    if verification is not None and not verification["ok"]:
        errors.append(f"high watermarks sum {verification['high_watermark_sum']}, acknowledged "
                      f"{verification['acknowledged']} (+ {verification['unknown_fate']} of unknown fate)")
    return errors


def _render_rebalance(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = _wide_console("rebalance", report["machine"])
    c = report["config"]
    console.print(f"records={c['records']:,} value_bytes={c['value_bytes']} batch={c['batch']} fsync={c['fsync']} "
                  f"nodes={c['nodes']}+1 replication_factor={c['replication_factor']} partitions={c['partitions']} "
                  f"load_rate={c['load_rate']}")
    cluster = report.get("cluster", {})
    preload = cluster.get("preload")
    if preload:
        console.print(f"preload: {preload['acknowledged']:,} records acknowledged at acks=quorum (produce_batch, "
                      f"window {BATCH_WINDOW}) in {preload['seconds']:.2f} s = {_fmt_rate(preload['records_per_s'])} "
                      f"records/s; high watermarks sum {preload.get('high_watermark_sum', 0):,}")
    moves = [(name, cluster[name]) for name in ("join", "leave") if name in cluster and "skipped" not in cluster[name]]
    if moves:
        table = Table(title=f"Partition moves ({cluster['partitions']} partitions, replication factor "
                            f"{cluster['replication_factor']}): from the start of the move to handoffs == 0 and "
                            "every replica in sync")
        for name, right in (("move", False), ("node", False), ("total s", True), ("node ready s", True),
                            ("ring changed s", True), ("partitions moved (ring predicts)", True),
                            ("leaders moved", True), ("moved MB", True), ("MB/s", True), ("received MB", True)):
            table.add_column(name, justify="right" if right else "left")
        for name, move in moves:
            ready = move.get("ready_s" if name == "join" else "leave_returned_s")
            moved = move.get("moved", [])
            predicted = move.get("predicted_moved", [])
            table.add_row(name, f"{move['node']} ({move.get('node_id', '')})"
                          + (" [metadata leader]" if move.get("was_metadata_leader") else ""),
                          "[red]not done[/red]" if move.get("done_s") is None else f"{move['done_s']:.2f}",
                          _seconds(ready), _seconds(move.get("ring_s")),
                          f"{len(moved)} ({len(predicted)}{'' if move.get('moved_as_predicted') else ', differs'})",
                          str(move.get("leaders_moved", "")), _mb(move.get("moved_bytes")),
                          "" if "moved_mb_per_s" not in move else f"{move['moved_mb_per_s']:.1f}",
                          _mb(move.get("received_bytes")))
        console.print(table)
        console.print("total s: from the start of the joining node's process / the leave call until status shows "
                      "handoffs == 0, the ring's replica sets and every replica in sync. node ready s: the joining "
                      "node printed ready / leave returned. moved MB: the size, when the move started, of the "
                      "partitions whose replica set changed (each got one new replica); MB/s = moved MB / total s. "
                      "received MB: growth of the receiving nodes' data directories (the new node; for a leave the "
                      "others), records written meanwhile included.")
        sizes = Table(title="Bytes on disk per node (MB, apparent size of the data directory)")
        sizes.add_column("node")
        columns = [("after preload", cluster.get("bytes_after_preload", {}))]
        columns += [(f"after {name}", move.get("bytes_after", {})) for name, move in moves]
        for label, _ in columns:
            sizes.add_column(label, justify="right")
        labels = sorted({label for _, column in columns for label in column}, key=lambda x: int(x[4:]))
        for label in labels:
            sizes.add_row(label, *[_mb(column.get(label)) for _, column in columns])
        console.print(sizes)
    load = cluster.get("load")
    if load:
        lt = Table(title=f"Producer during the moves: produce_batch of {load['batch']} records, {load['window_batches']} "
                         f"in flight, acks={load['acks']}, "
                         + ("as fast as it goes" if load["rate"] is None else f"paced to {load['rate']:,} records/s"))
        for name in ("window", "seconds", "records/s", "batch p50 ms", "batch p99 ms", "batch max ms",
                     "longest stall s", "failed batches"):
            lt.add_column(name, justify="left" if name in ("window", "failed batches") else "right")
        for name, move in moves:
            for key, label in (("load_before", f"{LOAD_BEFORE_S:.0f} s before the {name}"),
                               ("load_during", f"during the {name}")):
                w = move.get(key)
                if not w:
                    continue
                lat = w.get("batch_latency", {})
                lt.add_row(label, f"{w['seconds']:.2f}", _fmt_rate(w["records_per_s"]),
                           *[f"{lat[k] / 1000:.1f}" if k in lat else "" for k in ("p50_us", "p99_us", "max_us")],
                           f"{w['longest_stall_s']:.2f}",
                           ", ".join(f"{k} {v}" for k, v in w["failed_batches"].items()) or "none")
        console.print(lt)
    _print_cpu(console, [("preload (acks=quorum)", preload or {})] + [(name, move) for name, move in moves])
    _print_load_warning(console, report)
    for name, move in moves:
        if move.get("done_s") is not None:
            console.print(f"{name}: moved partitions {move['moved']}, the ring predicts {move['predicted_moved']}; "
                          f"replica lists in ring order {move['replicas_in_ring_order']}/{cluster['partitions']}, "
                          f"leaders at the ring owner {move['leaders_at_ring_owner']}/{cluster['partitions']}; "
                          f"status polls {move['status_polls']} (every {REBALANCE_POLL_S} s), failed "
                          f"{move['status_failures']}")
    leave = cluster.get("leave", {})
    if "skipped" in leave:
        console.print(f"[yellow]leave not measured: {leave['skipped']}[/yellow]")
    v = cluster.get("verification")
    if v is not None:
        console.print(f"verification: high watermarks sum {v['high_watermark_sum']:,}, acknowledged "
                      f"{v['acknowledged']:,} (+ {v['unknown_fate']:,} of unknown fate) -> "
                      f"{'OK' if v['ok'] else 'MISMATCH'}")
    for error in report["errors"]:
        console.print(f"[red]not measured / failed: {error}[/red]")


def _cluster_label(cluster: dict[str, Any], node_id: str | None) -> str:
    ids = cluster.get("node_ids", [])
    return f"node{ids.index(node_id) + 1}" if node_id in ids else str(node_id)


def _run_replication(args: Any) -> int:
    """``meshq bench replication``: baseline, one node, ``--nodes`` replicated nodes, failover; returns the exit code."""
    problems = []
    if not 1 <= args.nodes <= 9:
        problems.append("--nodes must be from 1 to 9")
    if not 1 <= args.replication_factor <= args.nodes:
        problems.append("--replication-factor must be from 1 to --nodes")
    if args.failover_repeats < 0:
        problems.append("--failover-repeats must be 0 or more")
    if args.failover_repeats > 0 and args.nodes < 2:
        problems.append("failover needs --nodes 2 or more (or --failover-repeats 0)")
    if args.seed:
        problems.append("bench replication starts its own nodes; --seed is for bench produce")
    if problems:
        for problem in problems:
            print(f"meshq bench: {problem}", file=sys.stderr)
        return EXIT_USAGE

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "scenario": "replication",
            "machine": _machine(),
            "config": {"records": args.records, "sync_records": args.sync_records, "value_bytes": args.value_bytes,
                       "batch": args.batch, "fsync": args.fsync, "nodes": args.nodes,
                       "replication_factor": args.replication_factor, "partitions": PARTITIONS,
                       "failover_repeats": args.failover_repeats, "failover_acks": args.failover_acks,
                       "failover_timeout_s": args.failover_timeout, "failover_deadline_s": args.failover_deadline,
                       "in_sync_timeout_s": args.in_sync_timeout,
                       "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        _progress("raw pyzmq baseline")
        report["baseline"] = _run_baseline(args.records, args.batch, args.value_bytes, args.sync_records, workdir)
        _progress("one node, replication factor 1, acks=leader")
        single_args = argparse.Namespace(**{**vars(args), "acks": "leader"})
        report["single_node"] = _run_meshq(single_args, workdir, [], with_async=False)
        report["cluster"] = _run_cluster(args, workdir)
        report["targets"] = _replication_targets(report)
        report["errors"] = _replication_errors(report)
        return report

    return _measure_and_report(args, measure, _render_replication, lambda report: bool(report["errors"]))


def _parse_load_rate(text: str) -> tuple[bool, int | None]:
    """``--load-rate``: ``0`` (no producer during the moves), ``max`` (as fast as it goes) or records/s.
    Returns (with_load, rate or None for max); raises ValueError."""
    if text.strip().lower() == "max":
        return True, None
    rate = int(text)
    if rate < 0:
        raise ValueError(text)
    return rate > 0, rate or None


def _run_rebalance(args: Any) -> int:
    """``meshq bench rebalance``: preload ``--nodes`` nodes, time a join and a leave; returns the exit code."""
    problems = []
    if not 1 <= args.nodes <= 8:
        problems.append("--nodes must be from 1 to 8 (one more joins)")
    if not 1 <= args.replication_factor <= args.nodes:
        problems.append("--replication-factor must be from 1 to --nodes")
    if args.seed:
        problems.append("bench rebalance starts its own nodes; --seed is for bench produce")
    try:
        with_load, load_rate = _parse_load_rate(args.load_rate)
    except ValueError:
        problems.append("--load-rate must be 0 (none), max or a number of records/s")
    if problems:
        for problem in problems:
            print(f"meshq bench: {problem}", file=sys.stderr)
        return EXIT_USAGE

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "scenario": "rebalance",
            "machine": _machine(),
            "config": {"records": args.records, "value_bytes": args.value_bytes, "batch": args.batch,
                       "fsync": args.fsync, "nodes": args.nodes, "replication_factor": args.replication_factor,
                       "partitions": REBALANCE_PARTITIONS, "load_rate": args.load_rate,
                       "move_timeout_s": args.move_timeout, "skip_leave": args.skip_leave,
                       "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        report["cluster"] = _run_rebalance_cluster(args, workdir, load_rate, with_load)
        report["errors"] = _rebalance_errors(report)
        return report

    return _measure_and_report(args, measure, _render_rebalance, lambda report: bool(report["errors"]))


def _measure_and_report(args: Any, measure: Callable[[str], dict[str, Any]], render: Callable[[dict[str, Any]], None],
                        failed: Callable[[dict[str, Any]], bool]) -> int:
    """Run ``measure(workdir)`` in a temporary directory (always removed), print the report as JSON
    or tables, and return the exit code (``failed(report)``: a part could not be measured or checked)."""
    workdir = tempfile.mkdtemp(prefix="meshq-bench-")
    try:
        report = measure(workdir)
    except BenchError as exc:
        print(f"meshq bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return EXIT_FAILED if failed(report) else EXIT_OK


# ---------------------------------------------------------------------- entry point
def run_bench(args: Any) -> int:
    """``meshq bench produce``, ``replication`` or ``rebalance``; returns the process exit code."""
    if args.scenario not in ("produce", "replication", "rebalance"):
        print(f"meshq bench: unknown scenario {args.scenario!r}", file=sys.stderr)
        return EXIT_USAGE
    problems = []
    if args.records < 1:
        problems.append("--records must be at least 1")
    if args.sync_records < 0:
        problems.append("--sync-records must be 0 or more")
    if args.value_bytes < 1:
        problems.append("--value-bytes must be at least 1")
    if not 1 <= args.batch <= 100_000:
        problems.append("--batch must be from 1 to 100000")
    if problems:
        for problem in problems:
            print(f"meshq bench: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.scenario == "replication":
        return _run_replication(args)
    if args.scenario == "rebalance":
        return _run_rebalance(args)
    seeds = list(args.seed or [])

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "machine": _machine(),
            "config": {"records": args.records, "sync_records": args.sync_records, "value_bytes": args.value_bytes,
                       "batch": args.batch, "acks": args.acks, "fsync": args.fsync,
                       "node": "external " + ",".join(seeds) if seeds else "child process",
                       "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        report["baseline"] = _run_baseline(args.records, args.batch, args.value_bytes, args.sync_records, workdir)
        report["meshq"] = _run_meshq(args, workdir, seeds)
        report["targets"] = _targets(report)
        return report

    return _measure_and_report(args, measure, _render, lambda report: not report["meshq"]["verification"]["ok"])


__all__ = ["run_bench"]
