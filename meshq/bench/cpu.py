"""CPU accounting: which thread of which process was busy, and how busy the rest of the machine was.

Theory of operation
-------------------
During each timed section the CPU time (user + system) of every thread of the processes
involved is read from ``/proc/<pid>/task/*/stat`` before and after (``_CpuSampler``), and the
whole machine's from ``/proc/stat`` (``machine_busy``): the report says which thread was busy
(the bottleneck) and how much CPU other processes took (on a small shared machine they distort
every figure). ``_other_load`` measures the machine for a second before a run, and
``_machine`` describes it for the report's first line. Linux only: elsewhere the readings are
empty or None.
"""

from __future__ import annotations

import collections
import os
import platform
import threading
import time
from typing import Any

import msgpack
import zmq

try:
    _CLK_TCK = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    _CLK_TCK = 100


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


def machine_busy() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (None elsewhere).

    Read it twice: the busy seconds' difference over the seconds between the reads is how many
    cores the whole machine kept busy meanwhile.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK, sum(fields) / _CLK_TCK


def _other_load(seconds: float = 1.0) -> float | None:
    """CPU used by the whole machine over ``seconds`` while this benchmark is idle, in cores."""
    first = machine_busy()
    time.sleep(seconds)
    second = machine_busy()
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
        self._machine0 = machine_busy()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.elapsed += time.perf_counter() - self._t0
        machine = machine_busy()
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
        per_process: dict[str, float] = {}
        for (label, _tid), (_name, seconds) in self.cpu.items():
            per_process[label] = per_process.get(label, 0.0) + seconds
        out["process_seconds"] = {label: round(seconds, 6) for label, seconds in sorted(per_process.items())}
        out["ours_seconds"] = round(ours, 6)
        if self.elapsed > 0:
            out["ours_percent"] = round(100 * ours / self.elapsed, 1)
            out["machine_percent"] = round(100 * self.machine_busy / self.elapsed, 1)
            out["other_percent"] = round(max(0.0, 100 * (self.machine_busy - ours) / self.elapsed), 1)
        return out


def cpu_us_per_record(cpu: dict[str, Any], records: int) -> dict[str, float]:
    """CPU µs per record of each sampled process (kernel per-thread accounting, user + system,
    the figures ``getrusage`` adds up), plus ``all`` for their sum."""
    if records <= 0 or "process_seconds" not in cpu:
        return {}
    out = {label: round(seconds * 1e6 / records, 2) for label, seconds in cpu["process_seconds"].items()}
    out["all"] = round(cpu["ours_seconds"] * 1e6 / records, 2)
    return out
