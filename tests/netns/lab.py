"""A small LAN made of Linux network namespaces, and `meshq node` processes inside it.

Layout (``<tag>`` is random per lab, so concurrent runs never collide)::

    mq-br-<tag>   holds bridge ``br0`` (multicast snooping off: every mDNS packet is flooded)
    mq-h1-<tag>   eth0 10.77.<n>.1/24 ── veth ── p1 ┐
    mq-h2-<tag>   eth0 10.77.<n>.2/24 ── veth ── p2 ├─ br0
    mq-h3-<tag>   eth0 10.77.<n>.3/24 ── veth ── p3 ┘

``Lab(split=N)`` hangs hosts 1..N on ``br0`` and the others on a second bridge ``br1`` (same subnet, two
separate LANs); ``join_bridges()`` plugs a cable (veth ``j0``/``j1``) between them. ``Lab(hosts=N)`` sets
the number of hosts, ``Lab(keys=True)`` makes a key set (``meshq keygen``) every node, writer and probe uses.

The addresses exist only inside these namespaces; nothing is routed to or from the host's
own namespace, so no test packet (mDNS multicast included) ever leaves the lab. Each
namespace has ``lo`` up and a multicast route on ``eth0``.

Teardown (in a finalizer, pass or fail): kill every process we started in the lab by PID,
``ip netns del`` every namespace (that removes the veths and the bridge with them), check
``ip netns list`` holds none of them, remove the temporary directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any

from tests.procs import REAP_DEADLINE_S, START_DEADLINE_S, STOP_DEADLINE_S, Exit, end_process, read_log, read_ready_line
from tests.procs import child_env as python_child_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE_PORT = 7100


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def tc(netns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "tc", *args], check=True, capture_output=True, timeout=20)


def drop_in_bridge(bridge_netns: str, port: str, *match: str) -> None:
    """Cut as a real link cut does: packets leaving the bridge through ``port`` (towards its host) that match the
    u32 selectors ``match`` (e.g. ``"match", "ip", "src", "10.0.0.2/32"``) die in the bridge, redirected to
    ``bh0``, a veth that stays down (made on the first call). ``heal_in_bridge`` lifts it."""
    if ip("-n", bridge_netns, "link", "show", "bh0", check=False).returncode != 0:
        ip("-n", bridge_netns, "link", "add", "bh0", "type", "veth", "peer", "name", "bh1")
    tc(bridge_netns, "qdisc", "add", "dev", port, "clsact")
    tc(bridge_netns, "filter", "add", "dev", port, "egress", "protocol", "ip", "prio", "1", "u32", *match,
       "action", "mirred", "egress", "redirect", "dev", "bh0")


def heal_in_bridge(bridge_netns: str, port: str) -> None:
    tc(bridge_netns, "qdisc", "del", "dev", port, "clsact")


def netns_names() -> set[str]:
    """Names listed by ``ip netns list`` (each line is ``name`` or ``name (id: N)``)."""
    out = ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def child_env() -> dict[str, str]:
    env = python_child_env()
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for name in ("MESHQ_SEEDS", "MESHQ_INTERFACES", "MESHQ_CLUSTER"):
        env.pop(name, None)  # the tests say exactly what they mean
    return env


class Host:
    """One host namespace with its address."""

    def __init__(self, lab: Lab, index: int) -> None:
        self.lab = lab
        self.index = index
        self.netns = f"mq-h{index}-{lab.tag}"
        self.address = f"{lab.prefix}.{index}"

    def run(self, *argv: str, input_bytes: bytes | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """Run a command inside this namespace to completion (killed by PID at the timeout)."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], input=input_bytes, capture_output=True,
                              timeout=timeout_s, cwd=REPO, env=child_env())

    def meshq(self, *args: str, input_bytes: bytes | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "meshq", *args, input_bytes=input_bytes, timeout_s=timeout_s)


class NsNode:
    """`meshq node` inside one namespace, mDNS pinned to the namespace's own address."""

    def __init__(self, host: Host, cluster: str, data_dir: str, log_path: str, port: int = NODE_PORT,
                 extra: list[str] | None = None, keys: str | None = None) -> None:
        self.host = host
        self.extra = list(extra or [])  # more `meshq node` options (e.g. --min-free-bytes)
        self.keys = keys  # the cluster's key set directory (DIR/cluster) when the lab runs with keys
        self.cluster = cluster
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port
        self.process: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}

    @property
    def seed(self) -> str:
        return f"{self.host.address}:{self.port}"

    @property
    def node_id(self) -> str:
        return self.ready["node_id"]

    def start(self, timeout_s: float = START_DEADLINE_S) -> NsNode:
        command = ["ip", "netns", "exec", self.host.netns, sys.executable, "-m", "meshq", "node",
                   "--data", self.data_dir, "--host", self.host.address, "--port", str(self.port),
                   "--interface", self.host.address, "--cluster", self.cluster, *self.extra]
        if self.keys is not None:
            command += ["--keys", self.keys]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                            cwd=REPO, env=child_env())
        line, problem = read_ready_line(self.process, timeout_s)
        if not line.startswith(b"{"):
            self.kill()
            raise RuntimeError(f"node in {self.host.netns} did not become ready: {problem or repr(line)}\n"
                               f"{self.log_text()[-3000:]}")
        self.ready = json.loads(line)
        return self

    def log_text(self) -> str:
        return read_log(self.log_path)

    def kill(self) -> None:
        end_process(self.process, graceful=False)

    def stop(self, timeout_s: float = STOP_DEADLINE_S) -> Exit:
        """SIGTERM (a clean stop) and wait until it exits by itself (at most ``timeout_s``: see ``end_process``)."""
        return end_process(self.process, timeout_s)


class NsWriter:
    """A writer process inside one namespace (``python -m tests.netns.lab writer``): a client node there, one
    ``SyncWriter`` per partition producing unique values with acks=quorum; every attempt comes back as a JSON line
    and lands in ``self.log`` (a ``tests.multinode.helpers.WriteLog``). Closing its stdin stops it."""

    def __init__(self, host: Host, cluster: str, name: str, seeds: list[str], topic: str, partitions: int,
                 log_path: str, keys: str | None = None) -> None:
        from tests.multinode.helpers import WriteLog

        self.host, self.cluster, self.name, self.seeds = host, cluster, name, seeds
        self.topic, self.partitions, self.log_path = topic, partitions, log_path
        self.keys = keys  # a client key set directory (DIR/clients/NAME) when the lab runs with keys
        self.log = WriteLog()
        self.ready = threading.Event()
        self.done: dict[str, Any] | None = None
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> NsWriter:
        command = ["ip", "netns", "exec", self.host.netns, sys.executable, "-m", "tests.netns.lab", "writer",
                   "--cluster", self.cluster, "--host", self.host.address, "--topic", self.topic,
                   "--name", self.name, "--partitions", str(self.partitions)]
        for seed in self.seeds:
            command += ["--seed", seed]
        if self.keys is not None:
            command += ["--keys", self.keys]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            cwd=REPO, env=child_env())
        self._reader = threading.Thread(target=self._read, name=f"ns-writer-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        from tests.multinode.helpers import Attempt

        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "ready" in message:
                self.ready.set()
            elif "done" in message:
                self.done = message
            else:
                self.log.record(Attempt.from_json(message))

    def wait_ready(self, timeout_s: float) -> None:
        if not self.ready.wait(timeout_s):
            raise AssertionError(f"writer {self.name} in {self.host.netns} not ready within {timeout_s} s:\n"
                                 f"{self.log_text()[-3000:]}")

    def stop(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """Close stdin (the writer stops, joins its threads, stops its client), wait; returns its final report."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"writer {self.name} did not stop within {timeout_s} s:\n"
                                 f"{self.log_text()[-3000:]}") from None
        if self._reader is not None:
            self._reader.join(REAP_DEADLINE_S)  # it ends at the end of the (exited) writer's output
        if self.process.returncode != 0 or self.done is None:
            raise AssertionError(f"writer {self.name} exited {self.process.returncode}:\n{self.log_text()[-3000:]}")
        return self.done

    def kill(self) -> None:
        end_process(self.process, graceful=False, close_stdout=False)  # the reader thread drains it

    def log_text(self) -> str:
        return read_log(self.log_path)


class Lab:
    """Namespaces, bridge, veths, and the node processes of one test."""

    def __init__(self, hosts: int = 3, keys: bool = False, split: int = 0) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = f"10.77.{random.randrange(1, 255)}"
        self.bridge_netns = f"mq-br-{self.tag}"
        self.hosts = [Host(self, i) for i in range(1, hosts + 1)]
        self.created: list[str] = []  # namespaces to delete, in creation order
        self.nodes: list[NsNode] = []
        self.writers: list[NsWriter] = []
        self.root = tempfile.mkdtemp(prefix="meshq-netns-")
        self.cluster = f"ns-{self.tag}"
        self.torn_down = False
        # split > 0: hosts 1..split hang on bridge br0, the others on br1, two separate LANs until join_bridges()
        self.split = split
        self.keys: str | None = None  # the key set directory (meshq keygen) when built with keys
        if keys:
            from meshq.keys import keygen

            self.keys = str(keygen(f"{self.root}/keys"))

    @property
    def node_keys(self) -> str | None:
        return f"{self.keys}/cluster" if self.keys else None

    @property
    def admin_keys(self) -> str | None:
        return f"{self.keys}/clients/admin" if self.keys else None

    def client_args(self) -> list[str]:
        """``meshq`` client options that reach this lab's cluster without mDNS (``--seed`` still to add)."""
        return ["--cluster", self.cluster, "--no-mdns", *(["--keys", self.admin_keys] if self.admin_keys else [])]

    @property
    def netns(self) -> list[str]:
        return [self.bridge_netns, *(h.netns for h in self.hosts)]

    def build(self) -> Lab:
        br = self.bridge_netns
        self._add_netns(br)
        ip("-n", br, "link", "set", "lo", "up")
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        ip("-n", br, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", br, "link", "set", "br0", "up")
        if self.split:
            ip("-n", br, "link", "add", "br1", "type", "bridge")
            ip("-n", br, "link", "set", "br1", "type", "bridge", "mcast_snooping", "0")
            ip("-n", br, "link", "set", "br1", "up")
        for host in self.hosts:
            self._add_netns(host.netns)
            port = f"p{host.index}"
            ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            ip("-n", br, "link", "set", port, "master", "br1" if self.split and host.index > self.split else "br0")
            ip("-n", br, "link", "set", port, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "multicast", "on")
            ip("-n", host.netns, "link", "set", "eth0", "up")
            ip("-n", host.netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        return self

    def join_bridges(self) -> None:
        """Join the two LANs of a split lab: a cable (veth pair j0/j1) between br0 and br1, brought up."""
        assert self.split, "join_bridges needs a lab built with split=N"
        br = self.bridge_netns
        ip("-n", br, "link", "add", "j0", "type", "veth", "peer", "name", "j1")
        ip("-n", br, "link", "set", "j0", "master", "br0")
        ip("-n", br, "link", "set", "j1", "master", "br1")
        ip("-n", br, "link", "set", "j0", "up")
        ip("-n", br, "link", "set", "j1", "up")

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)

    def start_node(self, host: Host, extra: list[str] | None = None) -> NsNode:
        node = NsNode(host, self.cluster, f"{self.root}/{host.netns}", f"{self.root}/{host.netns}.log", extra=extra,
                      keys=self.node_keys)
        self.nodes.append(node)
        return node.start()

    def start_writer(self, host: Host, name: str, topic: str, partitions: int,
                     seeds: list[str] | None = None) -> NsWriter:
        """A writer process in ``host`` seeded with ``seeds`` (default: every node of the lab; it reaches those its
        side can)."""
        seeds = [n.seed for n in self.nodes] if seeds is None else seeds
        writer = NsWriter(host, self.cluster, name, seeds, topic, partitions,
                          f"{self.root}/writer-{name}.log", keys=self.admin_keys)
        self.writers.append(writer)
        return writer.start()

    def probe(self, from_host: Host, nodes: list[NsNode]) -> dict[str, dict | None]:
        """Each node's own status ({seed: status or None}), asked from inside ``from_host``."""
        result = from_host.run(sys.executable, "-m", "tests.multinode.probe", "--cluster", self.cluster,
                               "--timeout", "1.5", *(["--keys", self.admin_keys] if self.admin_keys else []),
                               *(f"tcp://{n.seed}" for n in nodes), timeout_s=30)
        out: dict[str, dict | None] = {n.seed: None for n in nodes}
        for line in result.stdout.decode().splitlines():
            answer = json.loads(line)
            out[answer["endpoint"].removeprefix("tcp://")] = answer.get("status")
        return out

    def teardown(self) -> None:
        """Kill our processes, delete our namespaces, remove our files. Safe to call twice."""
        if self.torn_down:
            return
        self.torn_down = True
        errors = []
        for writer in self.writers:
            try:
                writer.kill()
            except Exception as exc:  # keep tearing down
                errors.append(f"kill writer {writer.name}: {exc}")
        for node in self.nodes:
            try:
                node.kill()
            except Exception as exc:  # keep tearing down
                errors.append(f"kill {node.host.netns}: {exc}")
        for name in self.created:
            # Anything still running inside a namespace of ours was started by this lab: kill it by PID.
            pids = ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for name in reversed(self.created):
            result = ip("netns", "del", name, check=False)
            if result.returncode != 0:
                errors.append(f"ip netns del {name}: {result.stderr.strip()}")
        shutil.rmtree(self.root, ignore_errors=True)
        left = netns_names() & set(self.created)
        if left or errors:
            raise AssertionError(f"lab teardown incomplete: namespaces left {sorted(left)}; errors {errors}")


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def writer_main(argv: list[str] | None = None) -> int:
    """``python -m tests.netns.lab writer ...``: run ``NsWriter``'s side inside a namespace (stops at stdin EOF)."""
    import argparse

    import meshq
    from tests.multinode.helpers import Attempt, SyncWriter, WriteLog

    parser = argparse.ArgumentParser(prog="python -m tests.netns.lab writer")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--seed", action="append", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--keys", help="client key set directory (DIR/clients/NAME) of a cluster with keys")
    args = parser.parse_args(argv)
    out_lock = threading.Lock()

    def emit(message: dict) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def on_attempt(attempt: Attempt) -> None:
        emit(attempt.to_json())

    client = meshq.Node(cluster=args.cluster, role="client", seeds=args.seed, mdns=False, host=args.host,
                        keys=args.keys).start()
    try:
        client.wait_ready(timeout=30)
        log = WriteLog(on_attempt=on_attempt)
        writers = [SyncWriter(client, args.topic, f"{args.name}-p{p}", log, partition=p, timeout_s=args.timeout)
                   for p in range(args.partitions)]
        for writer in writers:
            writer.start()
        emit({"ready": True})
        sys.stdin.read()  # the test closes our stdin to stop us
        for writer in writers:
            writer.stop()
        for writer in writers:
            writer.join(60)
        stuck = [w.name for w in writers if w.is_alive()]
    finally:
        client.stop()
    emit({"done": True, "stuck": stuck})
    return 0 if not stuck else 3


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        sys.exit(writer_main(sys.argv[2:]))
    sys.exit(f"usage: python -m tests.netns.lab writer --cluster C --host IP --seed H:P ... (got {sys.argv[1:]})")
