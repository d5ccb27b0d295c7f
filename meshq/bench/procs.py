"""Child processes: one ``meshq node``, a cluster of them, and ``_Child``, which every child runs under.

Theory of operation
-------------------
A child prints one JSON line per event on stdout (``{"event": "ready", ...}``); a reader thread
queues the lines and ``_Child.wait_event`` waits for one with a deadline, quoting the end of the
child's stderr (a file in the run's temporary directory) when it does not come. Every child is
stopped by its PID in ``finally`` blocks (SIGTERM, then SIGKILL) or killed with SIGKILL on
purpose (a failover), never by name. No mDNS: nodes run with ``--no-mdns`` on 127.0.0.1 and
find each other through seeds.

``_Cluster`` is ``count`` ``meshq node`` children with fixed ports, so a killed node restarts in
place on its data: the first forms the cluster alone, the others join through it as a seed, a
restarted node gets every other node as a seed and a joining one (``add``) every running node.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from meshq.bench.errors import BenchError
from meshq.testing.ports import free_port

READY_TIMEOUT_S = 20.0  # a child process (or the client) not ready by then has failed to start
PARTITIONS = 8  # every node's --partitions, and the partitions of the produce and replication topics


class _Child:
    """A child process that prints one JSON line per event on stdout."""

    def __init__(self, argv: list[str], stderr_path: str, env: dict | None = None, commands: bool = False) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.PIPE if commands else subprocess.DEVNULL, env=env, close_fds=True)
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

    def send(self, line: str) -> None:
        """Write one command line to the child's stdin (a child started with ``commands=True``)."""
        assert self.proc.stdin is not None, "started without commands=True"
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise BenchError(f"child {self.pid} no longer reads commands ({exc}){self._tail()}") from None

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
            self._close_streams()
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
            self._close_streams()

    def _close_streams(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:  # (a dead child's pipe)
                pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def _start_node(args: Any, workdir: str) -> tuple[_Child, str]:
    data = os.path.join(workdir, "node-data")
    argv = [sys.executable, "-m", "meshq", "node", "--data", data, "--host", "127.0.0.1", "--port", "0",
            "--no-mdns", "--fsync", args.fsync, "--partitions", str(PARTITIONS), "--cluster", args.cluster,
            "--log-level", "WARNING"]
    if getattr(args, "curve_keys", None):  # bench produce --curve: the node runs with the cluster keys
        argv += ["--keys", os.path.join(args.curve_keys, "cluster")]
    child = _Child(argv, os.path.join(workdir, "node.stderr"))
    try:
        ready = child.wait_event("ready", READY_TIMEOUT_S)
    except BaseException:
        child.stop()
        raise
    address = ready["address"]  # tcp://127.0.0.1:PORT
    return child, address.split("://", 1)[1]



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
        self.ports = [(free_port(), free_port()) for _ in range(count)]
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
        if getattr(self.args, "copy_rate", None) is not None:
            argv += ["--copy-rate", f"{self.args.copy_rate:g}"]
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
        self.ports.append((free_port(), free_port()))
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


def _node_tails(cluster: _Cluster) -> str:
    """The end of every node's stderr, for an error that needs the nodes' side of the story."""
    return "".join(f"\nnode{i + 1} ({cluster.node_ids[i] or 'no id'}, pid {child.pid}){child._tail()}"
                   for i, child in enumerate(cluster.children) if child is not None)
