"""Where a synchronous ``acks=quorum`` produce spends its time: latency, CPU and thread switches.

Starts three ``meshq node`` processes on 127.0.0.1 (no mDNS, replication factor 3) and a
client ``meshq.Node`` in this process, then times ``--count`` sequential ``produce`` calls to
one partition (one leader, two followers) and reports, per request:

* latency p50 / p90 / p99;
* CPU time (user + system) of each process, split into its Python threads (the meshq runtime
  thread and, in the client, the caller) and its ZeroMQ I/O thread, from ``/proc``;
* voluntary + involuntary context switches of each thread, from ``/proc``.

``Node.produce`` is sent from the calling thread when it can be (``meshq.io.direct``); with
``--both-paths`` the rounds alternate between that and the runtime-thread path (the fast
path switched off for the round), an interleaved A/B of the two in one run.

With ``--wake`` it also measures what one ``send`` costs the sender when the ZeroMQ I/O thread
is asleep (every message of a synchronous chain) against when it is busy (pipelined), with bare
pyzmq: the price of one thread wake-up on this machine.

With ``--pyspy DIR`` (``pip install py-spy``) each node process is sampled by ``py-spy record``
(non-blocking, idle samples left out) during the timed rounds only; the raw profiles go to
``DIR/<node>.txt`` and ``benchmarks/pyspy_summary.py`` summarises one.

With ``--cprofile DIR`` each node's runtime thread runs under ``cProfile`` from start to stop
(warm-up included; timed by the thread's CPU clock, one system call per event, which slows small functions: read it for call counts
and shares, not absolute times); stats go to ``DIR/nodeN.prof`` (``python -m pstats``).

    python benchmarks/sync_anatomy.py [--count 3000] [--rounds 3] [--both-paths] [--wake] [--pyspy DIR]
                                      [--cprofile DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import zmq
from relay_floor import socket_ports

from meshq.node import Node

TOPIC = "anatomy"
VALUE = b"v" * 100


def _thread_stats(pids: dict[str, int]) -> dict[tuple[str, str], tuple[float, int, float]]:
    """(process label, thread label) -> (cpu seconds, context switches, system cpu seconds), summed over
    same-named threads."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[str, str], tuple[float, int]] = {}
    for label, pid in pids.items():
        for task in glob.glob(f"/proc/{pid}/task/*"):
            try:
                stat = open(f"{task}/stat").read()
                status = open(f"{task}/status").read()
            except OSError:
                continue  # the thread ended
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            # (Python 3.11 does not name OS threads: the runtime and the caller both show as "python")
            name = "zmq-io" if "IO" in name else ("python threads" if name.startswith("python") else name)
            fields = stat.rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / ticks
            system = int(fields[12]) / ticks
            switches = sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
            old_cpu, old_switches, old_system = out.get((label, name), (0.0, 0, 0.0))
            out[(label, name)] = (old_cpu + cpu, old_switches + switches, old_system + system)
    return out


def _ready(child: subprocess.Popen) -> str:
    """The node id from a ``meshq node`` child's ``ready`` line on stdout."""
    line = child.stdout.readline() if child.stdout is not None else ""
    if not line:
        raise SystemExit(f"meshq node (pid {child.pid}) exited before it was ready; see its stderr file")
    return json.loads(line)["node_id"]


def _round(client: Node, count: int, pids: dict[str, int], label: str, direct: Any) -> None:
    before = _thread_stats(pids)
    samples = []
    for _ in range(count):
        started = time.perf_counter_ns()
        client.produce(TOPIC, VALUE, acks="quorum", partition=0)
        samples.append(time.perf_counter_ns() - started)
    after = _thread_stats(pids)
    samples.sort()
    p = [samples[int(len(samples) * q)] / 1000 for q in (0.5, 0.9, 0.99)]
    stats = direct.stats()
    print(f"{label}: latency p50 {p[0]:.0f} µs, p90 {p[1]:.0f} µs, p99 {p[2]:.0f} µs ({count} produces; "
          f"sent from the caller's thread so far: {stats['direct_produces']}, retried: {stats['direct_retries']})")
    total_cpu = total_switches = 0.0
    for label in pids:
        parts = []
        cpu_sum = system_sum = 0.0
        for (process, thread), (cpu, switches, system) in sorted(after.items()):
            if process != label:
                continue
            cpu0, switches0, system0 = before.get((process, thread), (0.0, 0, 0.0))
            system_sum += (system - system0) / count * 1e6
            cpu_us = (cpu - cpu0) / count * 1e6
            per = (switches - switches0) / count
            cpu_sum += cpu_us
            total_switches += per
            if cpu_us >= 5 or per >= 0.05:
                parts.append(f"{thread} {cpu_us:.0f} µs / {per:.1f} sw")
        total_cpu += cpu_sum
        print(f"  {label:18} {cpu_sum:5.0f} µs CPU per produce, {system_sum:.0f} of it system   ({', '.join(parts)})")
    print(f"  {'all':18} {total_cpu:5.0f} µs CPU per produce, {total_switches:.1f} thread switches per produce")


def _sink(port: int) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    while router.recv_multipart()[-1] != b"stop":
        pass


def _wake_cost(count: int) -> None:
    with socket_ports(1) as (port,):
        sink = multiprocessing.Process(target=_sink, args=(port,), daemon=True)
        sink.start()
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")  # blocks until connected
        time.sleep(0.2)
        for idle_s, what in ((0.0, "I/O thread busy (back-to-back sends)"), (0.0005, "I/O thread asleep (0.5 ms apart)")):
            samples = []
            for _ in range(count):
                if idle_s:
                    time.sleep(idle_s)
                else:
                    time.sleep(0) if len(samples) % 100 else time.sleep(0.001)  # stay below the HWM
                started = time.perf_counter_ns()
                dealer.send(VALUE)
                samples.append(time.perf_counter_ns() - started)
            print(f"one send, {what}: p50 {statistics.median(samples) / 1000:.1f} µs")
        dealer.send(b"stop")
        dealer.close(200)
        sink.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--both-paths", action="store_true",
                        help="alternate rounds: produce from the caller's thread / through the runtime thread")
    parser.add_argument("--wake", action="store_true", help="also time one send to an idle vs busy I/O thread")
    parser.add_argument("--cprofile", metavar="DIR", help="run each node's runtime thread under cProfile, stats to "
                                                          "DIR/nodeN.prof")
    parser.add_argument("--pyspy", metavar="DIR", help="sample each node with py-spy during the rounds, raw profiles "
                                                      "to DIR/<node>.txt")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="meshq-anatomy-")
    children: list[subprocess.Popen] = []
    node_ids: list[str] = []
    client = None
    spies: list[subprocess.Popen] = []
    try:
        with socket_ports(3) as ports:
            for index, port in enumerate(ports):
                start = [sys.executable, "-m", "meshq"]
                if args.cprofile:
                    os.makedirs(args.cprofile, exist_ok=True)
                    start = [sys.executable, __file__, "--node-cprofile", f"{args.cprofile}/node{index + 1}.prof"]
                argv = start + ["node", "--data", f"{workdir}/node{index + 1}",
                        "--host", "127.0.0.1", "--port", str(port), "--no-mdns", "--fsync", "interval",
                        "--partitions", "4", "--replication-factor", "3", "--log-level", "WARNING"]
                if index:
                    argv += ["--seed", f"127.0.0.1:{ports[0]}"]
                stderr = open(f"{workdir}/node{index + 1}.stderr", "w")
                children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True))
                if index == 0:
                    node_ids.append(_ready(children[0]))  # the first node forms the cluster the others join
            node_ids += [_ready(child) for child in children[1:]]
        client = Node(seeds=[f"127.0.0.1:{port}" for port in ports], mdns=False, role="client")
        client.start()
        client.wait_ready(timeout=30)
        client.create_topic(TOPIC, partitions=4, replication_factor=3)
        deadline = time.monotonic() + 60
        while True:  # until the partition has a leader and all three replicas are in sync
            try:
                client.produce(TOPIC, VALUE, acks="all", partition=0, timeout=2)
                status = client.status()
                part = next(t for t in status["topics"] if t["name"] == TOPIC)["partitions"][0]
                # all in sync, and led by its ring owner (first replica): leadership moves there
                # once it is caught up, which would otherwise happen in the middle of a round
                if len(part["in_sync"] or []) == 3 and part["leader"] == part["replicas"][0]:
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        pids = {}
        for index, child in enumerate(children):
            role = "leader" if node_ids[index] == part["leader"] else "follower"
            pids[f"node{index + 1} ({role})"] = child.pid
        pids["client"] = os.getpid()
        for _ in range(300):
            client.produce(TOPIC, VALUE, acks="quorum", partition=0)
        direct = client._direct
        if args.pyspy:
            os.makedirs(args.pyspy, exist_ok=True)
            for label, pid in pids.items():
                if label != "client":
                    name = label.replace(" ", "").replace("(", "-").replace(")", "")
                    spies.append(subprocess.Popen(
                        ["py-spy", "record", "--pid", str(pid), *os.environ.get("PYSPY_FLAGS", "--nonblocking").split(), "--threads", "-r", "1000",
                         "--format", "raw", "-o", f"{args.pyspy}/{name}.txt"],
                        stdout=subprocess.DEVNULL, stderr=open(f"{args.pyspy}/{name}.err", "w")))
            time.sleep(1.0)  # py-spy attaches
        for _ in range(args.rounds):
            for path in ("caller's thread", "runtime thread") if args.both_paths else ("produce",):
                client._direct = None if path == "runtime thread" else direct
                _round(client, args.count, pids, path, direct)
        client._direct = direct
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
        for spy in spies:
            spy.wait(30)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)
        if client is not None:
            client.stop()
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
    if args.cprofile:
        _profile_calls(args.cprofile, len(children))
    if args.wake:
        _wake_cost(args.count)


def _profile_calls(directory: str, nodes: int) -> None:
    """Python function calls per message handled, from each node's cProfile stats (warm-up and timers included):
    per produce served on the leader, per ``repl_append`` taken on a follower."""
    import pstats

    for index in range(1, nodes + 1):
        path = f"{directory}/node{index}.prof"
        if not os.path.exists(path):
            continue
        stats = pstats.Stats(path).stats  # (file, line, function) -> (primitive calls, calls, tottime, cumtime, callers)
        total = sum(entry[1] for entry in stats.values())
        produces = sum(entry[1] for (file, _line, name), entry in stats.items()
                       if name == "serve_produce" and file.endswith("partitions/server.py"))
        appends = sum(entry[1] for (file, _line, name), entry in stats.items()
                      if name == "_on_append" and file.endswith("core/replica.py"))
        handled, what = (produces, "produce served") if produces >= appends else (appends, "repl_append taken")
        if handled:
            print(f"node{index}: {total / handled:.0f} Python function calls per {what} ({total} calls, {handled} "
                  f"{what.split()[0]}s)")


def _node_cprofile(path: str, argv: list[str]) -> int:
    """``meshq node`` with its runtime thread's loop under cProfile; the stats are written when it stops."""
    import cProfile

    from meshq.cli.main import main as cli_main
    from meshq.io import runtime

    loop = runtime.Runtime._loop

    def profiled(self: Any, poller: Any) -> None:
        profiler = cProfile.Profile(time.thread_time)  # CPU time of this thread, not wall time
        profiler.enable()
        try:
            loop(self, poller)
        finally:
            profiler.disable()
            profiler.dump_stats(path)

    runtime.Runtime._loop = profiled  # type: ignore[method-assign]
    return cli_main(argv)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--node-cprofile":
        sys.exit(_node_cprofile(sys.argv[2], sys.argv[3:]))
    main()
