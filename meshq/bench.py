"""``meshq bench produce``: producer throughput and latency against a raw pyzmq baseline.

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
"""

from __future__ import annotations

import collections
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from typing import Any

import msgpack
import zmq

# Targets from the performance issue (docs/performance.md).
TARGET_PIPELINED_RPS = 1_000_000
TARGET_BASELINE_RATIO = 0.40
TARGET_SYNC_P50_US = 150.0

BASELINE_WINDOW = 16  # frames in flight in the raw pyzmq baseline
BATCH_WINDOW = 32  # produce_batch futures in flight (8 partitions x max 5 in flight each = 40)
SYNC_WARMUP = 500
PHASE_TIMEOUT_S = 60.0  # a phase that takes longer than this is aborted
READY_TIMEOUT_S = 20.0
PARTITIONS = 8
REPEATS = 3  # timed repetitions of the meshq produce_batch run; the median is reported
BASELINE_REPEATS = 5  # the baseline run is short (~0.1 s), so it is repeated more
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


def _check_deadline(start: float, what: str) -> None:
    if time.perf_counter() - start > PHASE_TIMEOUT_S:
        raise BenchError(f"{what} took longer than {PHASE_TIMEOUT_S:.0f} s; aborted")


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
                name = "meshq runtime" if label == "node" and others[label] == 1 else f"thread {tid} ({name})"
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
                     sampler: _CpuSampler) -> dict[str, Any]:
    batch = len(values)
    # warm-up (metadata, connection, first segment files): not timed, but counted
    acknowledged = 0
    for _ in range(5):
        client.produce_batch(topic, values, acks=acks).result(PHASE_TIMEOUT_S)
        acknowledged += batch
    produce_batch = client.produce_batch
    runs = []
    for _ in range(REPEATS):
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
                _check_deadline(start, "the produce_batch run")
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


def _run_meshq(args: Any, workdir: str, seeds: list[str]) -> dict[str, Any]:
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


# ---------------------------------------------------------------------- output
def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    m = report["machine"]
    c = report["config"]
    console.print(f"[bold]meshq bench produce[/bold]  {m['nproc']} CPU x {m['cpu']}, Python {m['python']}, "
                  f"pyzmq {m['pyzmq']} / libzmq {m['libzmq']}, msgpack {m['msgpack']}")
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

    def runs(row: dict) -> str:
        return " / ".join(f"{r / 1e6:.2f}M" for r in row.get("runs_records_per_s", [])) or "1 run"

    table.add_row(f"baseline: pyzmq DEALER->ROUTER, window {base['window_frames']}",
                  f"{base['records']:,}", f"{base['seconds']:.3f}", _fmt_rate(base["records_per_s"]),
                  f"{base['mb_per_s']:.1f}", "100%", runs(base))
    for key, label in (("produce_batch", f"meshq produce_batch, window {BATCH_WINDOW}"),
                       ("produce_async", "meshq produce_async + flush")):
        row = mq[key]
        table.add_row(label, f"{row['records']:,}", f"{row['seconds']:.3f}", _fmt_rate(row["records_per_s"]),
                      f"{row['mb_per_s']:.1f}", f"{row['records_per_s'] / base['records_per_s']:.1%}", runs(row))
    console.print(table)
    cpu = Table(title="CPU during the timed runs (% of one core; threads >= 1 %)")
    cpu.add_column("run")
    cpu.add_column("ours", justify="right")
    cpu.add_column("other procs", justify="right")
    cpu.add_column("process: thread cpu%")
    for label, row in (("baseline", base), ("produce_batch", mq["produce_batch"]),
                       ("produce_async", mq["produce_async"]), ("produce (sync)", mq.get("produce", {}))):
        info = row.get("cpu")
        if info:
            cpu.add_row(label, f"{info.get('ours_percent', 0):.0f}", f"{info.get('other_percent', 0):.0f}",
                        ", ".join(f"{c['process']}: {c['thread']} {c['cpu_percent']:.0f}" for c in info["threads"]))
    console.print(cpu)
    idle = report.get("machine_load_before_cores")
    if idle is not None and idle > 0.2:
        console.print(f"[yellow]warning: other processes used {idle:.2f} cores just before the run "
                      f"(see 'other procs' above); on a {m['nproc']}-core machine the figures are pessimistic"
                      "[/yellow]")
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


# ---------------------------------------------------------------------- entry point
def run_bench(args: Any) -> int:
    """``meshq bench produce``; returns the process exit code."""
    if args.scenario != "produce":
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
    seeds = list(args.seed or [])
    workdir = tempfile.mkdtemp(prefix="meshq-bench-")
    try:
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
    except BenchError as exc:
        print(f"meshq bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _render(report)
    return EXIT_OK if report["meshq"]["verification"]["ok"] else EXIT_FAILED


__all__ = ["run_bench"]
