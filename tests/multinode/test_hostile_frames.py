"""100,000 hostile frames at a live 3-node mesh while it serves (SPEC §3.6, issue 17 item 4).

Three `meshq node` processes on 127.0.0.1 hold a topic of 2 partitions, replication factor 3.
An in-process client runs one producer per partition (acks=quorum, every attempt recorded)
and a consumer reading from the earliest offset throughout. A hostile client (its own
process, ``tests/multinode/hostile.py``) throws ``HOSTILE_FRAMES`` frames as fast as pyzmq
takes them at the nodes' ROUTER ports and PUB/SUB (random bytes, truncated msgpack, wrong
types, huge declared lengths, another cluster, stale raft terms and leader epochs, replayed
replication batches, appends of the current epoch in another node's name, junk events and pub/sub data frames, junk subscriptions). Then:

- no node stops: every process still runs and answers status;
- nothing acknowledged is lost: the consumer reads every acknowledged record at its
  partition and offset, and the producers were acknowledged after the attack too;
- each node counted at least the frames it was sent that no node may accept, in
  ``invalid_frames`` (with the hostile client's address among its peers);
- memory stays bounded: each node's RSS (VmRSS of /proc/PID/status), sampled throughout,
  grows by less than ``RSS_GROWTH_LIMIT_MB`` over its level before the attack;
- the junk cannot flood a node's log: each stays under 64 KiB.

No timing is asserted; the waits are liveness bounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import meshq
from meshq.errors import MeshqError
from tests.multinode.helpers import (
    SyncWriter,
    WriteLog,
    node_id,
    view,
    wait_agreement,
    wait_replication_settled,
    wait_until,
)
from tests.procs import TIME_SCALE, child_env

pytestmark = pytest.mark.timeout(int(180 * TIME_SCALE))

TOPIC = "hostile"
HOSTILE_FRAMES = 100_000
RSS_GROWTH_LIMIT_MB = 64  # a node holds at most its queues' worth of ~1 KB frames; a leak of 100k frames is more


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Consumer(threading.Thread):
    """Reads the topic from the earliest offset for as long as the test runs."""

    def __init__(self, client: Any) -> None:
        super().__init__(name="test-consumer", daemon=True)
        self.client = client
        self.records: dict[tuple[int, int], bytes] = {}
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        consumer = wait_until(lambda: self._open(), 30, "a consumer of the topic", 0.5)
        try:
            while not self.stopping.is_set():
                try:
                    for record in consumer.poll(timeout=0.3, max_records=10_000):
                        self.records[(record.partition, record.offset)] = record.value
                except MeshqError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    self.stopping.wait(0.2)
        finally:
            consumer.close()

    def _open(self) -> Any:
        try:
            return self.client.consumer(TOPIC, start="earliest", timeout=5)
        except MeshqError:
            return None


def test_hostile_frames_lose_nothing_acknowledged_stop_no_node_and_are_counted(mesh):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=40 * TIME_SCALE)
    client = meshq.Node(cluster=mesh.cluster, role="client", seeds=[n.seed for n in nodes], mdns=False).start()
    writers: list[SyncWriter] = []
    consumer: Consumer | None = None
    try:
        client.wait_ready(timeout=30 * TIME_SCALE)
        client.create_topic(TOPIC, partitions=2, replication_factor=3)
        wait_replication_settled(nodes, TOPIC, timeout_s=30 * TIME_SCALE)
        log = WriteLog()
        writers = [SyncWriter(client, TOPIC, f"w{p}", log, partition=p, acks="quorum", pause_s=0.005)
                   for p in range(2)]
        for writer in writers:
            writer.start()
        consumer = Consumer(client)
        consumer.start()
        wait_until(lambda: sum(1 for a in log.snapshot() if a.ok) >= 20, 30 * TIME_SCALE,
                   "the producers to be acknowledged before the attack")

        views = {node_id(n): view(n) for n in nodes}
        assert all(views.values()), "a node did not answer status before the attack"
        # (a node's PUB address: from the client's own membership view, which learnt it by hello/gossip)
        pub_addresses = {m.node_id: m.pub_address for m in client.core.mesh.members.members.values()}
        before = {name: v["invalid_frames"] for name, v in views.items()}
        rss_before = {node_id(n): rss_kb(n.process.pid) for n in nodes}
        rss_peak = dict(rss_before)

        partitions = []
        for n in nodes:  # each partition as its leader sees it (epoch, configuration version)
            for topic in views[node_id(n)]["topics"]:
                for p in topic["partitions"] if topic["name"] == TOPIC else []:
                    if p["leader"] == node_id(n) and p.get("role", "leader") == "leader":
                        partitions.append({"partition": p["partition"], "leader": p["leader"], "epoch": p["epoch"],
                                           "cv": p.get("config_version", 0), "replicas": p["replicas"]})
        assert len(partitions) == 2, partitions
        spec = {"cluster": mesh.cluster, "topic": TOPIC, "count": HOSTILE_FRAMES, "seed": 17, "pool": 1400,
                "partitions": partitions,
                "nodes": [{"node_id": node_id(n), "address": f"tcp://{n.seed}",
                           "pub_address": pub_addresses[node_id(n)]} for n in nodes]}
        attack_started = time.monotonic()
        attacker = subprocess.Popen([sys.executable, "-m", "tests.multinode.hostile", json.dumps(spec)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
        try:
            while attacker.poll() is None:
                for n in nodes:
                    rss_peak[node_id(n)] = max(rss_peak[node_id(n)], rss_kb(n.process.pid))
                time.sleep(0.1)
                assert time.monotonic() - attack_started < 120 * TIME_SCALE, "the hostile client never finished"
            out, err = attacker.communicate()
        finally:
            if attacker.poll() is None:
                attacker.kill()
                attacker.wait()
        assert attacker.returncode == 0, err.decode(errors="replace")[-3000:]
        report = json.loads(out.decode().strip().splitlines()[-1])
        sent = dict(zip([node_id(n) for n in nodes], report["sent"]))
        assert sum(s["total"] for s in sent.values()) >= HOSTILE_FRAMES

        # every node counted what it was sent that no node may accept (the ROUTER loses nothing:
        # ZeroMQ's flow control holds the sender back), and keeps serving status
        def counted() -> dict | None:
            after = {}
            for n in nodes:
                status = view(n)
                if status is None:
                    return None
                name = node_id(n)
                rss_peak[name] = max(rss_peak[name], rss_kb(n.process.pid))
                grown = status["invalid_frames"]["total"] - before[name]["total"]
                if grown < sent[name]["invalid"]:
                    return None
                after[name] = status
            return after

        after = wait_until(counted, 60 * TIME_SCALE, "every node to count the invalid frames it was sent",
                           interval_s=0.3, detail=lambda: json.dumps(
                               {node_id(n): (view(n) or {}).get("invalid_frames", {}).get("total") for n in nodes})
                           + " sent " + json.dumps(sent))
        for name, status in after.items():
            by_peer = status["invalid_frames"]["by_peer"]
            assert by_peer.get("127.0.0.1", 0) > before[name]["by_peer"].get("127.0.0.1", 0), by_peer
        for n in nodes:
            assert n.process.poll() is None, f"node {node_id(n)} stopped: {n.log_text()[-3000:]}"
            assert "crashed" not in n.log_text(), n.log_text()[-3000:]

        # the producers are still acknowledged after the attack
        attack_ended = time.monotonic()
        wait_until(lambda: sum(1 for a in log.snapshot() if a.ok and a.started_s > attack_ended) >= 20,
                   30 * TIME_SCALE, "the producers to be acknowledged after the attack")
        for writer in writers:
            writer.stop()
        for writer in writers:
            writer.join(timeout=30)
        acked = {(a.partition, a.offset): a.value for a in log.snapshot() if a.ok}
        # the consumer reads every acknowledged record, at its partition and offset
        wait_until(lambda: all(consumer.records.get(key) == value for key, value in acked.items()),
                   60 * TIME_SCALE, "the consumer to read every acknowledged record",
                   detail=lambda: f"missing {sorted(set(acked) - set(consumer.records))[:20]} of {len(acked)}")
        # no hostile frame stored anything: its records carry the value b"hostile"
        assert b"hostile" not in set(consumer.records.values())
        growth_mb = {name: (rss_peak[name] - rss_before[name]) / 1024 for name in rss_before}
        print(f"\nhostile frames: {report['kinds']} sent in {report['seconds']:.1f} s, all read by "
              f"{report['delivered_seconds']:.1f} s; acknowledged {len(acked)}; "
              f"RSS before {({k: v // 1024 for k, v in rss_before.items()})} MB, peak growth "
              f"{({k: round(v, 1) for k, v in growth_mb.items()})} MB; invalid counted "
              f"{({k: s['invalid_frames']['total'] - before[k]['total'] for k, s in after.items()})}")
        assert all(growth < RSS_GROWTH_LIMIT_MB for growth in growth_mb.values()), growth_mb
        log_bytes = {node_id(n): len(n.log_text()) for n in nodes}
        print(f"node log sizes after the attack: {log_bytes}")
        assert all(size < 64 * 1024 for size in log_bytes.values()), log_bytes  # junk cannot flood the log
    finally:
        for writer in writers:
            writer.stop()
        if consumer is not None:
            consumer.stopping.set()
            consumer.join(timeout=10)
        client.stop()
