"""A small LAN made of Linux network namespaces, and `meshq node` processes inside it.

Layout (``<tag>`` is random per lab, so concurrent runs never collide)::

    mq-br-<tag>   holds bridge ``br0`` (multicast snooping off: every mDNS packet is flooded)
    mq-h1-<tag>   eth0 10.77.<n>.1/24 ── veth ── p1 ┐
    mq-h2-<tag>   eth0 10.77.<n>.2/24 ── veth ── p2 ├─ br0
    mq-h3-<tag>   eth0 10.77.<n>.3/24 ── veth ── p3 ┘

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
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE_PORT = 7100


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_names() -> set[str]:
    """Names listed by ``ip netns list`` (each line is ``name`` or ``name (id: N)``)."""
    out = ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
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

    def __init__(self, host: Host, cluster: str, data_dir: str, log_path: str, port: int = NODE_PORT) -> None:
        self.host = host
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

    def start(self, timeout_s: float = 30.0) -> NsNode:
        command = ["ip", "netns", "exec", self.host.netns, sys.executable, "-m", "meshq", "node",
                   "--data", self.data_dir, "--host", self.host.address, "--port", str(self.port),
                   "--interface", self.host.address, "--cluster", self.cluster]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                            cwd=REPO, env=child_env())
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline and self.process.poll() is None:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if readable:
                line = self.process.stdout.readline()
                break
        if not line.startswith(b"{"):
            self.kill()
            raise RuntimeError(f"node in {self.host.netns} did not become ready: {line!r}\n{self.log_text()[-3000:]}")
        self.ready = json.loads(line)
        return self

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


class Lab:
    """Namespaces, bridge, veths, and the node processes of one test."""

    def __init__(self, hosts: int = 3) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = f"10.77.{random.randrange(1, 255)}"
        self.bridge_netns = f"mq-br-{self.tag}"
        self.hosts = [Host(self, i) for i in range(1, hosts + 1)]
        self.created: list[str] = []  # namespaces to delete, in creation order
        self.nodes: list[NsNode] = []
        self.root = tempfile.mkdtemp(prefix="meshq-netns-")
        self.cluster = f"ns-{self.tag}"
        self.torn_down = False

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
        for host in self.hosts:
            self._add_netns(host.netns)
            port = f"p{host.index}"
            ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            ip("-n", br, "link", "set", port, "master", "br0")
            ip("-n", br, "link", "set", port, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "multicast", "on")
            ip("-n", host.netns, "link", "set", "eth0", "up")
            ip("-n", host.netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        return self

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)

    def start_node(self, host: Host) -> NsNode:
        node = NsNode(host, self.cluster, f"{self.root}/{host.netns}", f"{self.root}/{host.netns}.log")
        self.nodes.append(node)
        return node.start()

    def probe(self, from_host: Host, nodes: list[NsNode]) -> dict[str, dict | None]:
        """Each node's own status ({seed: status or None}), asked from inside ``from_host``."""
        result = from_host.run(sys.executable, "-m", "tests.multinode.probe", "--cluster", self.cluster,
                               "--timeout", "1.5", *(f"tcp://{n.seed}" for n in nodes), timeout_s=30)
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
