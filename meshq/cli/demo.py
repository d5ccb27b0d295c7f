"""``meshq demo``: the zero-configuration first run (SPEC §4.2).

Theory of operation
-------------------
The demo is a script of steps, each printed as it happens:

1. start three ``meshq node`` processes on 127.0.0.1, mDNS pinned to loopback, no seeds, in
   a cluster named for this run (so two demos, or a demo and a test, never meet), with their
   data in a temporary directory (removed at the end) or under ``--data DIR`` (kept);
2. find them by mDNS as any CLI command does (``meshq.cli.connect``) and show each member as
   it appears, until the three agree on the storage membership;
3. produce ``--records`` records with ``acks=quorum`` and read them back, with progress bars;
4. SIGKILL the node that leads the most partitions and show the new leaders;
5. produce as many records again on the two survivors and read the whole topic back;
6. print a table, per partition, of records acknowledged and records read back: every
   acknowledged record must be read back with its value at its offset.

Every process it started is stopped by PID at the end, also on failure and on Ctrl-C
(SIGTERM, then SIGKILL if it does not exit). Exit status 0 when every acknowledged record was
read back; 1 with the reason otherwise; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from meshq.errors import MeshqError

TOPIC = "demo-orders"
PARTITIONS = 6
NODES = 3
START_TIMEOUT_S = 30.0  # a node's ready line (imports, storage, sockets) on a slow machine
AGREE_TIMEOUT_S = 30.0  # the three nodes found and agreed on the storage membership
FAILOVER_TIMEOUT_S = 30.0  # every partition led by a survivor after the kill
READ_TIMEOUT_S = 30.0  # reading back everything acknowledged
STOP_TIMEOUT_S = 15.0  # SIGTERM -> exited, else SIGKILL
BATCH = 100  # records per produce_batch call


class DemoFailed(MeshqError):
    """A step of the demo did not do what it shows (the message says which and why)."""


@dataclass
class Child:
    """One ``meshq node`` the demo started."""

    name: str
    data_dir: str
    log_path: str
    process: subprocess.Popen
    node_id: str = ""
    address: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Ledger:
    """Every acknowledged record by (partition, offset), and what was read back."""

    acknowledged: dict[tuple[int, int], bytes] = field(default_factory=dict)
    read: dict[tuple[int, int], bytes] = field(default_factory=dict)
    failed_batches: int = 0

    def missing(self) -> list[tuple[int, int]]:
        return sorted(k for k, v in self.acknowledged.items() if self.read.get(k) != v)


class Demo:
    """The demo's state: its children, its client, what it printed (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rich.console import Console

        self.args = args
        self.cluster = f"demo-{uuid.uuid4().hex[:8]}"
        # the narrative goes to stderr when stdout carries the JSON result
        self.console = Console(stderr=args.json, highlight=False)
        self.children: list[Child] = []
        self.client: Any = None
        self.started_s = time.monotonic()
        self.ledger = Ledger()
        self.temporary = args.data is None
        self.root = tempfile.mkdtemp(prefix="meshq-demo-") if self.temporary else os.path.join(
            os.path.abspath(args.data), self.cluster)
        self.result: dict[str, Any] = {"cluster": self.cluster, "ok": False, "data_dir": self.root,
                                       "data_kept": not self.temporary}
        self.interrupted = False  # Ctrl-C or SIGTERM came (see check_interrupted)

    # ------------------------------------------------------------------ steps
    def run(self) -> int:
        self.say(f"[bold]meshq demo[/bold]: a 3-node mesh on 127.0.0.1, cluster [cyan]{self.cluster}[/cyan], "
                 f"data in {self.root}{' (temporary)' if self.temporary else ''}")
        self.start_nodes()
        self.discover()
        self.client.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=NODES, timeout=15.0)
        records = self.args.records
        self.produce(0, records, "produce (acks=quorum)")
        self.read_back("read back")
        victim, leaders_before = self.kill_a_leader()
        watch = FailoverWatch(self, {c.node_id for c in self.children if c is not victim}, self.killed_s)
        watch.start()
        try:
            self.produce(records, records, "keep producing through the failover")
        finally:
            watch.join(FAILOVER_TIMEOUT_S + 5.0)
        self.show_failover(watch, leaders_before)
        self.read_back("read everything back")
        return self.report(victim)

    def start_nodes(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise DemoFailed(f"cannot create the data directory {self.root} ({exc.strerror}); give --data a "
                             f"directory you can write") from None
        for i in range(1, NODES + 1):
            data_dir = os.path.join(self.root, f"node-{i}")
            log_path = os.path.join(self.root, f"node-{i}.log")
            command = [sys.executable, "-m", "meshq", "node", "--data", data_dir, "--host", "127.0.0.1",
                       "--port", "0", "--interface", "127.0.0.1", "--cluster", self.cluster]
            env = {k: v for k, v in os.environ.items() if k not in ("MESHQ_SEEDS", "MESHQ_INTERFACES")}
            with open(log_path, "ab") as log:
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                           env=env)
            self.children.append(Child(f"node-{i}", data_dir, log_path, process))
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in self.children:
            ready = _ready_line(child.process, deadline)
            if ready is None:
                raise DemoFailed(f"{child.name} did not start within {START_TIMEOUT_S:.0f} s (exit code "
                                 f"{child.process.poll()}); its log: {child.log_path}"
                                 f"{_tail(child.log_path)}")
            child.node_id, child.address = ready["node_id"], ready["address"]
            self.say(f"  started {child.name}: node [bold]{child.node_id}[/bold] at {child.address} "
                     f"(pid {child.pid}), mDNS on 127.0.0.1, no seed")
        self.result["nodes"] = [{"name": c.name, "node_id": c.node_id, "address": c.address, "pid": c.pid}
                                for c in self.children]

    def discover(self) -> None:
        from meshq.cli.connect import start_client

        connection = argparse.Namespace(cluster=self.cluster, seed=None, interface=["127.0.0.1"], no_mdns=False,
                                        advertise=None)
        started_s = time.monotonic()
        self.client = start_client(connection, discovery_timeout_s=10.0, reach_timeout_s=15.0)
        self.say(f"[bold]discovery[/bold]: found the cluster by mDNS in {time.monotonic() - started_s:.2f} s; "
                 f"members as they appear:")
        shown: set[str] = set()
        deadline = time.monotonic() + AGREE_TIMEOUT_S
        wanted = {c.node_id for c in self.children}
        while True:
            status = self._status()
            alive = {m["node_id"]: m for m in (status or {}).get("members", [])
                     if m["role"] == "storage" and m["state"] == "alive"}
            for node_id in sorted(set(alive) - shown):
                shown.add(node_id)
                self.say(f"  + {node_id} at {alive[node_id]['address']} "
                         f"({time.monotonic() - self.started_s:.1f} s after start)")
            voters = set((status or {}).get("metadata", {}).get("voters", []))
            if voters == wanted and wanted <= set(alive):
                break
            if time.monotonic() >= deadline:
                raise DemoFailed(f"the {NODES} nodes did not agree on the membership within {AGREE_TIMEOUT_S:.0f} s "
                                 f"(alive: {sorted(alive)}, agreed: {sorted(voters)}); node logs in {self.root}")
            time.sleep(0.2)
        self.say(f"  the {NODES} nodes agree on the storage membership "
                 f"({time.monotonic() - self.started_s:.1f} s after start)")
        self.result["discovery_s"] = time.monotonic() - started_s

    def produce(self, first: int, count: int, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        acknowledged = 0
        columns = (TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[retried]}"))
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(label, total=count, retried="")
            for start in range(first, first + count, BATCH):
                size = min(BATCH, first + count - start)
                attempt = 0
                while True:
                    attempt += 1
                    self.check_interrupted()
                    values = [f"order-{i:06d}-try{attempt}".encode() for i in range(start, start + size)]
                    try:
                        results = self.client.produce_batch(TOPIC, values, acks="quorum", timeout=5.0).result(10.0)
                    except (MeshqError, TimeoutError) as exc:  # a leader just died: retry the batch
                        self.ledger.failed_batches += 1
                        progress.update(task, retried=f"{self.ledger.failed_batches} batch(es) retried "
                                                      f"({type(exc).__name__})")
                        if attempt >= 20:
                            raise DemoFailed(f"records {start}-{start + size - 1} were not acknowledged after "
                                             f"{attempt} tries: {type(exc).__name__}: {exc}") from None
                        time.sleep(0.2)
                        continue
                    for metadata, value in zip(results, values):
                        self.ledger.acknowledged[(metadata.partition, metadata.offset)] = value
                    acknowledged += size
                    progress.update(task, completed=acknowledged)
                    break

    def read_back(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        wanted = set(self.ledger.acknowledged)
        self.ledger.read = {}
        consumer = self.client.consumer(TOPIC, start="earliest")
        columns = (TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        deadline = time.monotonic() + READ_TIMEOUT_S
        try:
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task(label, total=len(wanted))
                remaining = set(wanted)  # (not a set of everything read per poll: that made reading quadratic)
                while remaining and time.monotonic() < deadline:
                    self.check_interrupted()
                    for record in consumer.poll(timeout=0.5, max_records=1000):
                        position = (record.partition, record.offset)
                        self.ledger.read[position] = record.value
                        remaining.discard(position)
                    progress.update(task, completed=len(wanted) - len(remaining))
        finally:
            consumer.close()

    def kill_a_leader(self) -> tuple[Child, dict[int, str]]:
        leaders = self._leaders(self._status_retrying())
        counts = {c.node_id: sum(1 for leader in leaders.values() if leader == c.node_id) for c in self.children}
        victim = max(self.children, key=lambda c: (counts[c.node_id], c.name))
        self.say(f"[bold]failover[/bold]: leaders before: {_leaders_text(leaders)}")
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait(STOP_TIMEOUT_S)
        self.killed_s = time.monotonic()
        self.say(f"  [red]killed {victim.name} ({victim.node_id}, pid {victim.pid}) with SIGKILL[/red]: it led "
                 f"{counts[victim.node_id]} of {PARTITIONS} partitions")
        self.result["killed"] = {"name": victim.name, "node_id": victim.node_id, "pid": victim.pid,
                                 "led_partitions": sorted(p for p, n in leaders.items() if n == victim.node_id)}
        return victim, leaders

    def show_failover(self, watch: FailoverWatch, before: dict[int, str]) -> None:
        if watch.failover_s is None:
            raise DemoFailed(f"partitions still without a live leader {FAILOVER_TIMEOUT_S:.0f} s after the kill: "
                             f"{_leaders_text(watch.leaders)}")
        moved = {p: (before.get(p), leader) for p, leader in watch.leaders.items() if before.get(p) != leader}
        for p, (old, new) in sorted(moved.items()):
            self.say(f"  partition {p}: leader {old} -> [green]{new}[/green]")
        self.say(f"  every partition had a live leader again {watch.failover_s:.1f} s after the kill: "
                 f"{_leaders_text(watch.leaders)}")
        self.result["failover_s"] = watch.failover_s
        self.result["new_leaders"] = {str(p): new for p, (_old, new) in sorted(moved.items())}

    def report(self, victim: Child) -> int:
        from rich.table import Table

        missing = self.ledger.missing()
        table = Table(title=f"every acknowledged record, read back ({TOPIC}, {NODES} replicas, "
                            f"{victim.node_id} killed)")
        for column in ("partition", "acknowledged", "read back", "missing"):
            table.add_column(column, justify="right")
        rows = []
        for p in range(PARTITIONS):
            acked = [k for k in self.ledger.acknowledged if k[0] == p]
            read = sum(1 for k in acked if self.ledger.read.get(k) == self.ledger.acknowledged[k])
            rows.append({"partition": p, "acknowledged": len(acked), "read_back": read,
                         "missing": len(acked) - read})
            style = "red" if len(acked) != read else ""
            table.add_row(str(p), str(len(acked)), str(read), str(len(acked) - read), style=style)
        total_acked = len(self.ledger.acknowledged)
        total_read = total_acked - len(missing)
        table.add_row("all", str(total_acked), str(total_read), str(len(missing)), style="bold")
        elapsed_s = time.monotonic() - self.started_s
        self.result.update({"ok": not missing, "acknowledged": total_acked, "read_back": total_read,
                            "missing": len(missing), "retried_batches": self.ledger.failed_batches,
                            "partitions": rows, "elapsed_s": elapsed_s})
        self.console.print(table)
        if missing:
            raise DemoFailed(f"{len(missing)} acknowledged record(s) were not read back, e.g. partition "
                             f"{missing[0][0]} offset {missing[0][1]}; node logs in {self.root}")
        self.say(f"[green]every one of the {total_acked} acknowledged records was read back[/green] "
                 f"({self.ledger.failed_batches} batch(es) retried during the failover); "
                 f"{elapsed_s:.1f} s in all")
        return 0

    # ------------------------------------------------------------------ helpers
    def say(self, text: str) -> None:
        self.check_interrupted()
        self.console.print(text)

    def check_interrupted(self) -> None:
        """Stop here if Ctrl-C or SIGTERM came: their exception may have been swallowed by a library call
        that was running when the signal arrived, so every step checks the flag as well."""
        if self.interrupted:
            raise _Interrupted()

    def _status(self) -> dict | None:
        try:
            return self.client.status(timeout=2.0)
        except MeshqError:
            return None

    def _status_retrying(self) -> dict:
        deadline = time.monotonic() + 15.0
        while True:
            status = self._status()
            if status is not None and len(self._leaders(status)) == PARTITIONS:
                return status
            if time.monotonic() >= deadline:
                raise DemoFailed("the cluster did not report a leader for every partition within 15 s")
            time.sleep(0.2)

    @staticmethod
    def _leaders(status: dict) -> dict[int, str]:
        for topic in status.get("topics", []):
            if topic["name"] == TOPIC:
                return {p["partition"]: p["leader"] for p in topic["partitions"] if p["leader"] is not None}
        return {}

    def stop_everything(self) -> list[str]:
        """Stop the client and every child (SIGTERM by PID, SIGKILL after ``STOP_TIMEOUT_S``); the problems seen."""
        problems = []
        if self.client is not None:
            try:
                self.client.stop()
            except Exception as exc:  # keep stopping the children
                problems.append(f"stopping the demo's client: {exc}")
        for child in self.children:
            if child.process.poll() is None:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"{child.name} (pid {child.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s; killed")
                os.kill(child.pid, signal.SIGKILL)
                child.process.wait()
            if child.process.stdout is not None:
                child.process.stdout.close()
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems


class FailoverWatch(threading.Thread):
    """Asks the cluster's status every 0.2 s after the kill until every partition is led by a survivor."""

    def __init__(self, demo: Demo, survivors: set[str], killed_s: float) -> None:
        super().__init__(name="demo-failover-watch", daemon=True)
        self.demo, self.survivors, self.killed_s = demo, survivors, killed_s
        self.leaders: dict[int, str] = {}
        self.failover_s: float | None = None

    def run(self) -> None:
        deadline = self.killed_s + FAILOVER_TIMEOUT_S
        while time.monotonic() < deadline:
            self.leaders = self.demo._leaders(self.demo._status() or {})
            if len(self.leaders) == PARTITIONS and set(self.leaders.values()) <= self.survivors:
                self.failover_s = time.monotonic() - self.killed_s
                return
            time.sleep(0.2)


def _ready_line(process: subprocess.Popen, deadline_s: float) -> dict | None:
    """The node's ``{"event": "ready", ...}`` line, or None if it exits or the deadline passes first."""
    assert process.stdout is not None
    while time.monotonic() < deadline_s:
        readable, _, _ = select.select([process.stdout], [], [], min(0.5, max(0.0, deadline_s - time.monotonic())))
        if readable:
            line = process.stdout.readline()
            if line.startswith(b"{"):
                return json.loads(line)
            if not line:
                return None
        elif process.poll() is not None:
            return None
    return None


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    {line}" for line in text)


def _leaders_text(leaders: dict[int, str]) -> str:
    return ", ".join(f"p{p}={leader}" for p, leader in sorted(leaders.items())) or "none"


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM asked the demo to stop."""


def cmd_demo(args: argparse.Namespace) -> int:
    from meshq.cli.commands import _setup_logging

    _setup_logging(args, "ERROR")
    if args.records < 1:
        print("meshq demo: --records must be at least 1", file=sys.stderr)
        return 2

    demo = Demo(args)

    def on_signal(signum: int, frame: Any) -> None:
        demo.interrupted = True
        raise _Interrupted()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        code = demo.run()
    except (KeyboardInterrupt, _Interrupted):
        demo.result["error"] = "interrupted"
        print("meshq demo: interrupted; stopping every node it started", file=sys.stderr)
        code = 130
    except MeshqError as exc:
        demo.result["error"] = str(exc)
        print(f"meshq demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        problems = demo.stop_everything()
        for problem in problems:
            print(f"meshq demo: {problem}", file=sys.stderr)
        demo.result["stopped"] = {c.name: c.process.returncode for c in demo.children}
        if args.json:
            print(json.dumps(demo.result, indent=2), flush=True)
    return code
