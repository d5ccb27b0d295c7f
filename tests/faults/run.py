"""The fault run (issue #19 items 9-10): `meshq node` processes in network namespaces, a quorum producer and a
consumer running throughout, a nemesis mixing faults for N minutes, then a heal and an independent check.

Layout: ``tests.netns.lab.Lab`` with ``nodes + 1`` hosts on one bridge; hosts 1..N run one node each (data
directory on its own tmpfs, ``--min-free-bytes``), host N+1 runs the client processes (``tests.faults.client``:
producer with acks="quorum", one sequential thread per partition, a value unique per attempt; a consumer from the
earliest offset). The nemesis injects ONE fault at a time, holds it, heals it, pauses, and goes round the kinds in
a seeded random order:

- ``kill9``   SIGKILL a node, restart it on the same data directory after the hold (heal = ready again);
- ``sigstop`` SIGSTOP a node, SIGCONT after the hold;
- ``isolate`` one node's cable pulled (its bridge port down): 1 | N-1;
- ``split``   2 | N-2 between node hosts (the client on the majority side): tc u32 filters in the bridge, on
  the egress of each host's port, redirect packets from the other side to a device that is down (this kernel has
  no iptables/nft binary and no gact "drop" action). The packets die in the network, as in a real cut: the
  senders' TCP sees no error and backs its retransmissions off exponentially (a drop on the sender's own egress
  would fail the send locally, and Linux then retries every 500 ms without backing off, which hides the cost
  of a heal);
- ``split-client-minority`` the same with the client on the 2-node side: no quorum write can succeed until the
  heal, so "heal -> first ack" measures how fast the client gets back (issue #19 item 10);
- ``loss``    random loss of 5-20% both ways on one node's link (a classic-BPF ``ld rand`` tc filter; this
  kernel has no netem);
- ``slow``    one node's link capped at 256 kbit/s or 1 mbit/s both ways by tbf and saturated by a UDP flood
  to and from the client host at twice that rate (``tests.faults.flood``): the node's packets queue behind
  it for up to 300 ms, drops beyond (tbf queueing is the only delay this kernel offers without netem);
- ``starve``  one node stopped for 150 ms and run for 50 ms, over and over (SIGSTOP/SIGCONT): alive, answering every
  heartbeat within its timeouts, but slow — a node starved of CPU (a noisy neighbour, a throttled cgroup);
- ``diskfull`` one node's tmpfs filled until its free space is below ``--min-free-bytes`` (it refuses writes
  with StorageFullError), space returned after the hold;
- ``disk-enospc`` one node's tmpfs filled to the last byte (every write, metadata too, fails with ENOSPC), space
  returned after the hold.

Clock jumps are NOT injected: Linux has no per-namespace CLOCK_REALTIME (time namespaces offset only the
monotonic and boot clocks, and only before the first process enters them), and changing the machine's clock
would hit every other process on it.

Then: everything healed, writes resumed in every partition, the producer and consumer stopped, replication
settled, every partition drained from offset 0 through the public consumer API, the nodes stopped with SIGTERM and
every replica's log read offline and compared byte for byte below the high watermark. ``tests.faults.checker``
judges it. Printed: a table per fault kind (count, time, acks, errors, ack latency p50/p99, heal -> first ack)
and the totals (acknowledged, lost, duplicated, ...).
"""

from __future__ import annotations

import bisect
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.faults.checker import Verdict, check, percentile
from tests.multinode.helpers import check_logs_hold_records, check_replicas_identical, partitions_of, wait_until
from tests.netns.lab import REPO, Host, Lab, NsNode, child_env, ip

KINDS = ("kill9", "sigstop", "isolate", "split", "split-client-minority", "loss", "slow", "starve", "diskfull",
         "disk-enospc")
STARVE_S = (0.15, 0.05)  # the ``starve`` fault: stopped this long, then running this long, over and over
HEAL_TARGET_S = 1.0  # issue #19 item 10: a blocked partition's first ack within this after any heal
BLOCKED_S = 2.0  # a partition with no ack in the last BLOCKED_S before a heal counts as blocked by the fault
AFTER_HEAL_S = 10.0  # attempts started this long after a heal form the "after heal" phase
SETTLED_S = 3.0  # "settled" figures: attempts started this long or more into their fault (what the cluster did about it)
NOT_INJECTED = {"clock": "no per-namespace CLOCK_REALTIME on Linux (time namespaces offset only monotonic/boottime, "
                         "and only before a process enters them); the machine's clock is shared"}
TOPIC = "faults"
MIN_FREE = 8 * 1024 * 1024
Rec = namedtuple("Rec", "partition offset value")


@dataclass
class Fault:
    kind: str
    target: str
    detail: str
    start_s: float
    heal_s: float | None = None
    heal: Callable[[], None] | None = field(default=None, repr=False)


@dataclass
class Report:
    seed: int
    minutes: float
    nodes: int
    faults: list[Fault]
    verdict: Verdict
    problems: list[str]
    table: str
    attempts: int


def tc(host_netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", "netns", "exec", host_netns, "tc", *args], capture_output=True, text=True,
                            timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} in {host_netns} failed: {result.stderr.strip()}")
    return result


def _loss_filter(netns: str, device: str, percent: float) -> None:
    """Packets leaving ``device`` dropped with probability ``percent``%: classic BPF ``ld rand; jgt T`` matches
    and mirred redirects them to the down device ``bh0``."""
    threshold = int(percent / 100 * 2**32)
    tc(netns, "qdisc", "replace", "dev", device, "clsact")
    tc(netns, "filter", "add", "dev", device, "egress", "protocol", "all", "prio", "1", "bpf", "bytecode",
       f"4,32 0 0 4294963256,37 0 1 {threshold},6 0 0 0,6 0 0 4294967295",
       "action", "mirred", "egress", "redirect", "dev", "bh0")


def _drop_from(bridge_netns: str, port: str, addresses: list[str]) -> None:
    """Packets the bridge would hand to ``port`` (towards its host) from any of ``addresses`` redirected to the
    down device ``bh0``: lost in the network, so the sender's TCP backs off as after a real cut."""
    tc(bridge_netns, "qdisc", "replace", "dev", port, "clsact")
    for address in addresses:
        tc(bridge_netns, "filter", "add", "dev", port, "egress", "protocol", "ip", "prio", "1", "u32", "match", "ip",
           "src", f"{address}/32", "action", "mirred", "egress", "redirect", "dev", "bh0")


class FaultRun:
    def __init__(self, minutes: float, nodes: int = 5, seed: int | None = None, rate: float = 300.0,
                 partitions: int = 5, hold_s: tuple[float, float] = (5.0, 15.0),
                 pause_s: tuple[float, float] = (3.0, 8.0), tmpfs_mb: int = 256, kinds: tuple[str, ...] = KINDS,
                 out: Callable[[str], None] = print) -> None:
        if nodes < 5:
            raise ValueError("--nodes must be at least 5 (splits of 2 | 3 keep a majority of RF=3 replicas)")
        self.minutes, self.node_count, self.rate, self.partitions = minutes, nodes, rate, partitions
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.hold_s, self.pause_s, self.tmpfs_mb, self.kinds, self.out = hold_s, pause_s, tmpfs_mb, kinds, out
        self.lab = Lab(hosts=nodes + 1)
        self.nodes: list[NsNode] = []
        self.client_host: Host = self.lab.hosts[-1]
        self.mounts: list[str] = []
        self.fillers: set[str] = set()
        self.procs: list[subprocess.Popen] = []
        self.starvers: list[threading.Event] = []  # each stops a ``starve`` fault's thread
        self.faults: list[Fault] = []

    # -- set-up ----------------------------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        self.out(f"[faults {time.strftime('%H:%M:%S')}] {text}")

    def build(self) -> None:
        self.lab.build()
        for netns in self.lab.netns:  # the "black hole": a device that stays down; redirected packets die there
            ip("-n", netns, "link", "add", "bh0", "type", "veth", "peer", "name", "bh1")
        for host in self.lab.hosts[:-1]:
            data_dir = f"{self.lab.root}/{host.netns}"
            os.makedirs(data_dir)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_mb}m", "tmpfs", data_dir], check=True)
            self.mounts.append(data_dir)
        extra = ["--min-free-bytes", str(MIN_FREE), "--log-level", "WARNING"]
        first = self.lab.start_node(self.lab.hosts[0], extra=extra)
        self.nodes.append(first)
        # The others start at once, each seeded with this one, before it has formed anything: nodes that each know
        # only part of the others may form two clusters of the same name, which then merge (the one holding nothing
        # gives itself up: docs/operations.md, "Two clusters of the same name"). The agreement wait below covers it.
        errors: list[BaseException] = []
        lock = threading.Lock()

        def start(host: Host) -> None:
            try:
                node = self.lab.start_node(host, extra=[*extra, "--seed", first.seed])
                with lock:
                    self.nodes.append(node)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(h,)) for h in self.lab.hosts[1:-1]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        if errors:
            raise errors[0]
        self.nodes.sort(key=lambda n: n.host.index)
        try:
            self.wait(self.agreed, 120, f"one agreed membership of {self.node_count}")
        except AssertionError as exc:
            logs = "\n".join(f"--- log of {n.host.netns} (tail) ---\n{n.log_text()[-2000:]}" for n in self.nodes)
            raise AssertionError(f"{exc}\n{logs}") from None
        created = self.client_host.meshq("topics", "create", TOPIC, "--partitions", str(self.partitions),
                                         "--replication-factor", "3", "--seed", first.seed, "--cluster",
                                         self.lab.cluster, "--no-mdns", timeout_s=120)
        if created.returncode != 0:
            raise RuntimeError(f"topics create failed: {created.stderr.decode()[-2000:]}")
        self.wait(self.replication_state, 120, "every partition with 3 in-sync replicas")

    # -- views -----------------------------------------------------------------------------------------------------

    def views(self) -> dict[str, dict] | None:
        answers = self.lab.probe(self.client_host, self.nodes)
        if any(v is None for v in answers.values()):
            return None
        return {v["node_id"]: v for v in answers.values()}

    def agreed(self) -> bool:
        views = self.views()
        if views is None:
            return False
        expected = set(views)
        leaders = set()
        for status in views.values():
            states = {m["node_id"]: m["state"] for m in status["members"]}
            if any(states.get(i) != "alive" for i in expected):
                return False
            leaders.add(status["metadata"]["leader"])
        return len(leaders) == 1 and None not in leaders

    def replication_state(self) -> dict[int, dict] | None:
        """Each partition as its leader reports it, once settled: exactly one node reports itself leader (role
        "leader"), its in-sync set is its 3 replicas, and each replica's own view names it. (A node that holds no
        replica of a partition may keep an older leader in its view: ``stale_views`` lists those.)"""
        views = self.views()
        if views is None:
            return None
        parts = {nid: partitions_of(status, TOPIC) for nid, status in views.items()}
        if any(len(p) != self.partitions for p in parts.values()):
            return None
        state = {}
        for partition in range(self.partitions):
            claims = [nid for nid, p in parts.items()
                      if p[partition]["leader"] == nid and p[partition].get("role", "leader") == "leader"]
            if len(claims) != 1:
                return None
            mine = parts[claims[0]][partition]
            replicas = mine["replicas"]
            if len(replicas) != 3 or set(mine["in_sync"] or []) != set(replicas):
                return None
            if any(r not in parts or parts[r][partition]["leader"] != claims[0] for r in replicas):
                return None
            state[partition] = mine
        return state

    def stale_views(self, state: dict[int, dict]) -> list[str]:
        """Nodes outside a partition's replicas whose view names another leader than the settled one."""
        views = self.views() or {}
        out = []
        for nid, status in sorted(views.items()):
            for partition, p in sorted(partitions_of(status, TOPIC).items()):
                info = state.get(partition)
                if info is not None and nid not in info["replicas"] and p["leader"] != info["leader"]:
                    out.append(f"{nid} names {p['leader']} as leader of p{partition} (it is {info['leader']})")
        return out

    def describe(self) -> str:
        lines = []
        for seed, status in self.lab.probe(self.client_host, self.nodes).items():
            if status is None:
                lines.append(f"{seed}: no answer")
                continue
            parts = partitions_of(status, TOPIC)
            members = " ".join(f"{m['node_id']}={m['state']}" for m in status.get("members", []))
            meta = status.get("metadata", {})
            lines.append(f"{status['node_id']} @ {seed}: members [{members}] metadata leader={meta.get('leader')} "
                         f"term={meta.get('term')} voters={len(meta.get('voters') or [])}; " + ", ".join(
                             f"p{p}: leader={d['leader']} in_sync={d['in_sync']} hw={d['high_watermark']}"
                             for p, d in sorted(parts.items())))
        return "\n".join(lines)

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        return wait_until(condition, timeout_s, what, 0.5, detail=self.describe)

    # -- clients ---------------------------------------------------------------------------------------------------

    def client(self, mode: str, out: str, *more: str) -> subprocess.Popen:
        command = ["ip", "netns", "exec", self.client_host.netns, sys.executable, "-m", "tests.faults.client", mode,
                   "--cluster", self.lab.cluster, "--host", self.client_host.address, "--topic", TOPIC,
                   "--out", out, *more]
        for node in self.nodes:
            command += ["--seed", node.seed]
        with open(f"{self.lab.root}/client-{mode}.log", "ab") as log:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                                       env=child_env())
        self.procs.append(process)
        return process

    def wait_line(self, process: subprocess.Popen, key: str, timeout_s: float) -> dict:
        result: dict = {}

        def read() -> None:
            for line in process.stdout:
                message = json.loads(line)
                if key in message:
                    result.update(message)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not result:
            raise RuntimeError(f"client process gave no {key!r} line within {timeout_s} s")
        return result

    def read_lines(self, path: str) -> list[list]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    # -- the nemesis -----------------------------------------------------------------------------------------------

    def inject(self, kind: str) -> Fault:
        node = self.rng.choice(self.nodes)
        host = node.host
        now = time.monotonic
        port = f"p{host.index}"
        if kind == "kill9":
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(30)

            def heal() -> None:
                node.start()
            return Fault(kind, host.netns, "SIGKILL, restart after the hold", now(), heal=heal)
        if kind == "sigstop":
            node.process.send_signal(signal.SIGSTOP)
            return Fault(kind, host.netns, "SIGSTOP ... SIGCONT", now(),
                         heal=lambda: node.process.send_signal(signal.SIGCONT))
        if kind == "isolate":
            ip("-n", self.lab.bridge_netns, "link", "set", port, "down")
            return Fault(kind, host.netns, "bridge port down (1 | rest)", now(),
                         heal=lambda: ip("-n", self.lab.bridge_netns, "link", "set", port, "up"))
        if kind in ("split", "split-client-minority"):
            minority = self.rng.sample(self.nodes, 2)
            majority = [n for n in self.nodes if n not in minority]
            minority_hosts = [n.host for n in minority]
            majority_hosts = [n.host for n in majority]
            client_side = "majority" if kind == "split" else "minority"
            (majority_hosts if kind == "split" else minority_hosts).append(self.client_host)
            for h in minority_hosts:
                _drop_from(self.lab.bridge_netns, f"p{h.index}", [m.address for m in majority_hosts])
            for h in majority_hosts:
                _drop_from(self.lab.bridge_netns, f"p{h.index}", [m.address for m in minority_hosts])

            def heal() -> None:
                for h in minority_hosts + majority_hosts:
                    tc(self.lab.bridge_netns, "qdisc", "del", "dev", f"p{h.index}", "clsact")
            return Fault(kind, "+".join(n.host.netns for n in minority),
                         f"{len(minority)} | {len(majority)} nodes (client with the {client_side})", now(), heal=heal)
        if kind == "loss":
            percent = self.rng.choice([5, 10, 20])
            _loss_filter(host.netns, "eth0", percent)
            _loss_filter(self.lab.bridge_netns, port, percent)

            def heal() -> None:
                tc(host.netns, "qdisc", "del", "dev", "eth0", "clsact")
                tc(self.lab.bridge_netns, "qdisc", "del", "dev", port, "clsact")
            return Fault(kind, host.netns, f"{percent}% loss both ways", now(), heal=heal)
        if kind == "slow":
            rate = self.rng.choice(["256kbit", "1mbit"])
            for netns, device in ((host.netns, "eth0"), (self.lab.bridge_netns, port)):
                tc(netns, "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate, "burst", "8kb", "latency",
                   "300ms")
            # Other traffic saturating the link both ways (at twice its rate), as on a busy uplink: the node's own
            # packets queue behind it (up to the 300 ms tbf allows), so its round trips are slow, not only its bulk.
            flood_rate = str(2 * {"256kbit": 256_000, "1mbit": 1_000_000}[rate] // 8)
            floods = [subprocess.Popen(["ip", "netns", "exec", src.netns, sys.executable, "-m", "tests.faults.flood",
                                        dst.address, flood_rate], cwd=REPO, env=child_env(),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for src, dst in ((host, self.client_host), (self.client_host, host))]
            self.procs.extend(floods)

            def heal() -> None:
                for flood in floods:
                    flood.kill()
                    flood.wait(30)
                    self.procs.remove(flood)
                tc(host.netns, "qdisc", "del", "dev", "eth0", "root")
                tc(self.lab.bridge_netns, "qdisc", "del", "dev", port, "root")
            return Fault(kind, host.netns, f"tbf {rate} both ways, saturated by other traffic (queue <= 300 ms)",
                         now(), heal=heal)
        if kind == "starve":
            stop = threading.Event()
            process = node.process

            def starve() -> None:
                while not stop.is_set() and process.poll() is None:
                    process.send_signal(signal.SIGSTOP)
                    stop.wait(STARVE_S[0])
                    process.send_signal(signal.SIGCONT)
                    stop.wait(STARVE_S[1])

            starver = threading.Thread(target=starve, name="starve", daemon=True)
            starver.start()
            self.starvers.append(stop)

            def heal() -> None:
                stop.set()
                starver.join(10)
                self.starvers.remove(stop)
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
            return Fault(kind, host.netns, f"SIGSTOP {STARVE_S[0] * 1000:.0f} ms / SIGCONT {STARVE_S[1] * 1000:.0f} ms "
                         "over and over (a node alive but starved of CPU)", now(), heal=heal)
        if kind in ("diskfull", "disk-enospc"):
            filler = os.path.join(node.data_dir, "filler")
            stats = os.statvfs(node.data_dir)
            size = stats.f_bavail * stats.f_frsize - (MIN_FREE // 2 if kind == "diskfull" else 64 * 1024)
            self.fillers.add(filler)
            fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                if size > 0:
                    os.posix_fallocate(fd, 0, size)
                if kind == "disk-enospc":  # and the last pages, whatever the node wrote meanwhile
                    os.lseek(fd, 0, os.SEEK_END)
                    try:
                        while True:
                            os.write(fd, b"\0" * 4096)
                    except OSError:
                        pass
            finally:
                os.close(fd)

            def heal() -> None:
                os.unlink(filler)
                self.fillers.discard(filler)
            what = "to below --min-free-bytes" if kind == "diskfull" else "to the last byte (ENOSPC)"
            return Fault(kind, host.netns, f"tmpfs filled ({size // (1 << 20)} MiB) {what}", now(), heal=heal)
        raise ValueError(f"unknown fault kind {kind!r}")

    def heal_all(self) -> None:
        """Undo whatever may be left (after an error mid-fault): idempotent; "no such qdisc" is not an error."""
        for stop in list(self.starvers):
            stop.set()
        time.sleep(max(STARVE_S) * 2 if self.starvers else 0)  # (their last SIGSTOP is undone below)
        for netns in [h.netns for h in self.lab.hosts]:
            for qdisc in ("clsact", "root"):
                tc(netns, "qdisc", "del", "dev", "eth0", qdisc, check=False)
        for host in self.lab.hosts:
            for qdisc in ("clsact", "root"):
                tc(self.lab.bridge_netns, "qdisc", "del", "dev", f"p{host.index}", qdisc, check=False)
            ip("-n", self.lab.bridge_netns, "link", "set", f"p{host.index}", "up", check=False)
        for filler in list(self.fillers):
            try:
                os.unlink(filler)
            except FileNotFoundError:
                pass
            self.fillers.discard(filler)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)

    def nemesis(self) -> None:
        """Faults one at a time until ``minutes`` have passed AND every kind was injected at least once."""
        end = time.monotonic() + self.minutes * 60
        cycle: list[str] = []
        while time.monotonic() < end or not {f.kind for f in self.faults} >= set(self.kinds):
            if not cycle:
                cycle = list(self.kinds)
                self.rng.shuffle(cycle)
            kind = cycle.pop()
            fault = self.inject(kind)
            self.faults.append(fault)
            hold = self.rng.uniform(*self.hold_s)
            self.log(f"fault #{len(self.faults)} {kind} on {fault.target}: {fault.detail}; hold {hold:.1f} s")
            time.sleep(hold)
            assert fault.heal is not None
            fault.heal()
            fault.heal_s = time.monotonic()
            time.sleep(self.rng.uniform(*self.pause_s))

    # -- the run ---------------------------------------------------------------------------------------------------

    def run(self) -> Report:
        problems: list[str] = []
        try:
            self.log(f"seed {self.seed}: {self.node_count} nodes, {self.partitions} partitions RF=3, "
                     f"~{self.rate:.0f} records/s acks=quorum, {self.minutes} min of faults {list(self.kinds)}")
            self.build()
            self.log("cluster ready: " + ", ".join(f"{n.node_id}@{n.host.netns}" for n in self.nodes))
            acks_path, live_path = f"{self.lab.root}/acks.jsonl", f"{self.lab.root}/live.jsonl"
            producer = self.client("produce", acks_path, "--partitions", str(self.partitions), "--rate",
                                   str(self.rate), "--name", f"s{self.seed}")
            consumer = self.client("consume", live_path)
            self.wait_line(producer, "ready", 120)
            self.wait_line(consumer, "ready", 120)
            self.wait(lambda: self.acked_partitions(acks_path, 0.0) == set(range(self.partitions)), 60,
                      "acks in every partition before the first fault")
            nemesis_start = time.monotonic()
            consumer_errors: dict = {}
            try:
                self.nemesis()
            finally:
                self.heal_all()
            for node in self.nodes:  # a node that died by itself is a finding; restarted so the check can go on
                code = node.process.poll() if node.process is not None else None
                if code is not None:
                    problems.append(f"node {node.node_id} in {node.host.netns} exited by itself with code {code} "
                                    f"during the faults; end of its log:\n{node.log_text()[-3000:]}")
                    self.log(f"node {node.node_id} had exited with code {code}: restarting it")
                    node.start()
            healed = time.monotonic()
            self.log(f"nemesis done after {healed - nemesis_start:.0f} s and {len(self.faults)} faults; all healed")
            self.wait(lambda: self.acked_partitions(acks_path, healed) == set(range(self.partitions)), 120,
                      "acks in every partition after the final heal")
            time.sleep(3)
            for process, name in ((producer, "producer"), (consumer, "consumer")):
                process.stdin.close()
                done = self.wait_line(process, "done", 120)
                process.wait(60)
                if done.get("stuck"):
                    problems.append(f"{name} threads still blocked after stop: {done}")
                if name == "consumer":
                    consumer_errors = done.get("errors", {})
                if process.returncode != 0:
                    problems.append(f"{name} exited {process.returncode}")
            attempts = [tuple(a) for a in self.read_lines(acks_path)]
            acked_end: dict[int, int] = {}
            for a in attempts:
                if a[5] is None:
                    acked_end[a[0]] = max(acked_end.get(a[0], 0), a[1] + 1)
            previous: list[Any] = [None]

            def settled():
                state = self.replication_state()
                marks = None if state is None else {p: d["high_watermark"] for p, d in state.items()}
                ok = marks is not None and marks == previous[0] and all(
                    marks.get(p, 0) >= e for p, e in acked_end.items())
                previous[0] = marks
                return state if ok else None

            state = self.wait(settled, 180, f"replicas in sync with high watermarks >= acknowledged ends {acked_end}")
            high_watermarks = {p: d["high_watermark"] for p, d in state.items()}
            stale = self.stale_views(state)
            drain_path = f"{self.lab.root}/drain.jsonl"
            drainer = self.client("drain", drain_path, "--high-watermarks", json.dumps(high_watermarks))
            drainer.stdin.close()
            drainer.wait(300)
            if drainer.returncode != 0:
                problems.append(f"the drain exited {drainer.returncode}")
            drained = [tuple(r) for r in self.read_lines(drain_path)]
            live = [tuple(r[:3]) for r in self.read_lines(live_path)]
            verdict = check(attempts, drained, high_watermarks, live)
            for node in self.nodes:
                result = node.stop()
                if not result.clean:
                    problems.append(f"node {node.node_id} did not stop cleanly: {result}")
            logs, replica_problems = check_replicas_identical({n.node_id: n.data_dir for n in self.nodes}, TOPIC,
                                                              state)
            records = [Rec(p, o, v.encode()) for p, o, v in drained]
            verdict.replicas = replica_problems + check_logs_hold_records(logs, TOPIC, records, high_watermarks)
            problems = verdict.problems() + problems
            table = self.table(attempts, verdict, nemesis_start, healed, high_watermarks)
            table += f"\nthe live consumer's errors (it retried each): {consumer_errors}"
            texts = [n.log_text() for n in self.nodes]  # (WARNING and above: a preferred hand-off, INFO, is not there)
            counts = {what: sum(text.count(needle) for text in texts) for what, needle in (
                ("replicas that asked a slow leader to step aside (each logs its first request)",
                 "asking it to step aside"),
                ("hand-offs of a slow leader", "this leader slow)"),
                ("of which on the leader's own late timers", "own timers run late"))}
            table += "\nleadership moves in the nodes' logs: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            if stale:
                table += ("\nNOTE (availability, not safety): after settling, nodes holding no replica still name an "
                          "older leader: " + "; ".join(stale))
            self.out(table)
            for problem in problems:
                self.out(f"PROBLEM: {problem}")
            return Report(self.seed, self.minutes, self.node_count, self.faults, verdict, problems, table,
                          len(attempts))
        except BaseException:
            self.out("node views at the failure:\n" + self.describe_safely())
            raise

    def describe_safely(self) -> str:
        try:
            return self.describe()
        except Exception as exc:  # the lab may be half gone
            return f"(no views: {exc})"

    def acked_partitions(self, path: str, since_s: float) -> set[int]:
        try:
            return {a[0] for a in self.read_lines(path) if a[5] is None and a[3] >= since_s}
        except FileNotFoundError:
            return set()

    # -- the report ------------------------------------------------------------------------------------------------

    def table(self, attempts: list, verdict: Verdict, nemesis_start: float, healed: float,
              high_watermarks: dict[int, int]) -> str:
        def phase_of(started: float) -> str:
            for fault in self.faults:
                if fault.start_s <= started < (fault.heal_s or healed):
                    return fault.kind
            for fault in self.faults:
                if (fault.heal_s or healed) <= started < (fault.heal_s or healed) + AFTER_HEAL_S:
                    return "after heal"
            return "no fault"

        acked = [a for a in attempts if a[5] is None]
        by_phase: dict[str, list] = {}
        for a in attempts:
            by_phase.setdefault(phase_of(a[3]), []).append(a)
        ack_ends = sorted(a[4] for a in acked)
        # Availability around heals: the partitions a fault left without acks (none ended in the BLOCKED_S before its
        # heal) and, for each, the time from the heal to its first ack; and the time until every partition acked.
        first_ack: dict[str, list[float]] = {}
        all_acked: dict[str, list[float]] = {}
        blocked_count: dict[str, int] = {}
        per_partition_ends: dict[int, list[float]] = {}
        for a in acked:
            per_partition_ends.setdefault(a[0], []).append(a[4])
        for ends in per_partition_ends.values():
            ends.sort()
        slow_heals: list[str] = []  # blocked partitions whose first ack came over HEAL_TARGET_S after the heal: why
        for fault in self.faults:
            if fault.heal_s is None:
                continue
            after = []
            for p in range(self.partitions):
                ends = per_partition_ends.get(p, [])
                i = bisect.bisect_left(ends, fault.heal_s)
                first = ends[i] - fault.heal_s if i < len(ends) else None
                after.append(first)
                blocked = not (i > 0 and ends[i - 1] >= fault.heal_s - BLOCKED_S)
                if blocked and first is not None:
                    first_ack.setdefault(fault.kind, []).append(first)
                    blocked_count[fault.kind] = blocked_count.get(fault.kind, 0) + 1
                    if first > HEAL_TARGET_S:
                        slow_heals.append(self._slow_heal(fault, p, ends[i], attempts))
            if all(v is not None for v in after):
                all_acked.setdefault(fault.kind, []).append(max(after))

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.0f}"

        def s(values: list[float], q: float) -> str:
            v = percentile(values, q)
            return "-" if v is None else f"{v:.2f}"

        lines = [f"fault run: seed {self.seed}, {self.node_count} nodes, {self.partitions} partitions RF=3, "
                 f"acks=quorum, ~{self.rate:.0f} records/s, {self.minutes} min of faults "
                 f"({healed - nemesis_start:.0f} s)",
                 "(rows by when each attempt started: during a fault of that kind; \"after heal\": within 10 s after "
                 "a heal; \"no fault\": any other time. A partition is blocked at a heal when none of its acks "
                 f"ended in the {BLOCKED_S:.0f} s before it)",
                 "",
                 "| fault | injected | seconds | acked during | errors during | ack p50 ms | ack p99 ms "
                 "| blocked partitions at heal | heal->their first ack s (median/max) "
                 "| heal->every partition acked s (median/max) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        last_s = max((a[4] for a in attempts), default=healed)
        ends = [g.start_s for g in self.faults[1:]] + [last_s]
        after_heal_s = sum(min(AFTER_HEAL_S, max(0.0, end - (f.heal_s or healed))) for f, end in zip(self.faults, ends))
        span_s = (max(a[4] for a in attempts) - min(a[3] for a in attempts)) if attempts else 0.0
        for kind in [*self.kinds, "after heal", "no fault"]:
            faults = [f for f in self.faults if f.kind == kind]
            items = by_phase.get(kind, [])
            latencies = [a[4] - a[3] for a in items if a[5] is None]
            errors = [a for a in items if a[5] is not None]
            seconds = sum(((f.heal_s or healed) - f.start_s) for f in faults)
            injected = str(len(faults)) if kind in self.kinds else "-"
            if kind == "after heal":
                seconds = after_heal_s
            elif kind == "no fault":  # the rest of the producer's whole run (before, between and after the faults)
                seconds = span_s - seconds_total(self.faults, healed) - after_heal_s
            lines.append(f"| {kind} | {injected} | {seconds:.0f} | {len(latencies)} | {len(errors)} "
                         f"| {ms(percentile(latencies, 0.5))} | {ms(percentile(latencies, 0.99))} "
                         f"| {blocked_count.get(kind, 0) if kind in self.kinds else '-'} "
                         f"| {s(first_ack.get(kind, []), 0.5)}/{s(first_ack.get(kind, []), 1.0)} "
                         f"| {s(all_acked.get(kind, []), 0.5)}/{s(all_acked.get(kind, []), 1.0)} |")
        for kind, why in NOT_INJECTED.items():
            lines.append(f"| {kind} | not injected: {why} | | | | | | | | |")
        longest_gap = max((b - a for a, b in zip(ack_ends, ack_ends[1:])), default=0.0)
        settled: dict[str, list[float]] = {}
        for fault in self.faults:
            end = fault.heal_s or healed
            settled.setdefault(fault.kind, []).extend(
                a[4] - a[3] for a in acked if fault.start_s + SETTLED_S <= a[3] < end)
        lines += ["", f"ack p50/p99 ms of the attempts started {SETTLED_S:.0f} s or more into their fault (once the "
                  "cluster could act on it): " + "; ".join(
                      f"{kind} {ms(percentile(values, 0.5))}/{ms(percentile(values, 0.99))} ({len(values)} acked)"
                      for kind, values in sorted(settled.items()))]
        lines += ["", "heal -> first ack of each blocked partition, s (every heal): " + "; ".join(
            f"{kind} {' '.join(f'{v:.2f}' for v in sorted(values))}" for kind, values in sorted(first_ack.items()))]
        if slow_heals:
            lines += ["", f"blocked partitions acked over {HEAL_TARGET_S:.0f} s after a heal (times from the heal):",
                      *slow_heals]
        lines += ["",
                  f"attempts {verdict.attempts}, acknowledged {verdict.acked}, LOST {len(verdict.lost)}, "
                  f"duplicated {len(verdict.duplicates)}, order violations {len(verdict.order)}, "
                  f"offset problems {len(verdict.offsets)}, unexpected {len(verdict.unexpected)}, "
                  f"live reads diverged {len(verdict.live_diverged)} (of {verdict.live_seen} read during the run), "
                  f"replica divergences {len(verdict.replicas)}; stored though unacknowledged "
                  f"{verdict.stored_unacked}; drained {verdict.drained} = sum of high watermarks "
                  f"{sum(high_watermarks.values())}",
                  f"errors by type: {verdict.errors}",
                  f"longest time without any ack: {longest_gap:.2f} s"]
        return "\n".join(lines)

    @staticmethod
    def _slow_heal(fault: Any, partition: int, acked_at: float, attempts: list) -> str:
        """One line on a partition acked over ``HEAL_TARGET_S`` after ``fault``'s heal: the attempts that ended
        between the heal and that ack and the acked one, each as start..end (and its error), from the heal."""
        heal = fault.heal_s
        around = sorted((a for a in attempts if a[0] == partition and heal - 10.0 <= a[4] <= acked_at), key=lambda a: a[3])
        steps = [f"{a[3] - heal:+.2f}..{a[4] - heal:+.2f} {a[5] or 'ack'}" for a in around if a[4] >= heal or a[5]]
        return (f"  {fault.kind} of {heal - fault.start_s:.1f} s, partition {partition}: {acked_at - heal:.2f} s; "
                + ", ".join(steps[-6:]))

    # -- clean-up --------------------------------------------------------------------------------------------------

    def teardown(self) -> None:
        for process in self.procs:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
            node.kill()
        self.heal_all()
        for mount in self.mounts:
            subprocess.run(["umount", "-l", mount], check=False)
        self.lab.teardown()


def seconds_total(faults: list[Fault], healed: float) -> float:
    return sum((f.heal_s or healed) - f.start_s for f in faults)


def run_faults(**kwargs: Any) -> Report:
    """Build, run, check and tear down one fault run (teardown even when it fails)."""
    run = FaultRun(**kwargs)
    try:
        return run.run()
    finally:
        run.teardown()
