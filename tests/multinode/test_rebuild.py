"""A lost partition rebuilt, with real `meshq node` processes on 127.0.0.1 (issue #19 item 4).

Three nodes (``--member-timeout 8``), a topic of three partitions with replication factor 1. A
partition gets records, its only node is killed for good (SIGKILL, never restarted) and removed
after the member timeout; the partition then comes back on another node, empty, writable, its
offsets continuing past everything the dead node handed out; the survivors' status and logs
name the lost offsets. No timing is asserted; the waits are liveness bounds.

Run: ``tox -e multinode -- tests/multinode/test_rebuild.py``.
"""

from __future__ import annotations

import time

import pytest

import meshq
from meshq.core.metadata import REBUILD_GAP
from tests.multinode.helpers import node_id, partitions_of, view, wait_agreement, wait_until

TOPIC = "mn-rebuild"


@pytest.mark.timeout(120)
def test_the_only_replica_killed_for_good_its_partition_comes_back_writable_after_its_last_offset(mesh, timings):
    first = mesh.start(1, extra=["--member-timeout", "8"])[0]
    nodes = [first, *mesh.start(2, seeds=[first], extra=["--member-timeout", "8"])]
    wait_agreement(nodes, timeout_s=40)
    client = meshq.Node(cluster=mesh.cluster, role="client", seeds=[n.seed for n in nodes], mdns=False).start()
    try:
        client.wait_ready(timeout=30)
        client.create_topic(TOPIC, partitions=3, replication_factor=1)
        replicas = wait_until(lambda: {p: d["replicas"] for p, d in partitions_of(client.status(), TOPIC).items()
                                       if d.get("leader")} or None, 30, "every partition led")
        partition, (holder,) = sorted(replicas.items())[0]
        offsets = [client.produce(TOPIC, b"before-%d" % i, partition=partition).offset for i in range(5)]
        assert offsets == [0, 1, 2, 3, 4]
        time.sleep(1.5)  # a heartbeat or two report the log end offset (5); not a timing assertion
        victim = next(n for n in nodes if node_id(n) == holder)
        survivors = [n for n in nodes if n is not victim]
        killed_s = time.monotonic()
        victim.kill()  # for good: it never comes back

        def rebuilt() -> dict | None:
            for node in survivors:
                status = view(node)
                entry = partitions_of(status, TOPIC).get(partition) if status is not None else None
                if entry is not None and entry.get("rebuilt") and entry.get("leader") and entry.get("role") == "leader":
                    return entry
            return None

        entry = wait_until(rebuilt, 60, f"{TOPIC}/{partition} rebuilt and led on a survivor")
        timings("kill -9 of the only replica -> partition rebuilt and led (member_timeout 8 s)",
                time.monotonic() - killed_s)
        marker = entry["rebuilt"]
        assert marker["reported_end"] == 5 and marker["lost_offsets"] == [[0, 4]]
        assert marker["start_offset"] == 5 + REBUILD_GAP and entry["leader"] != holder
        # writable again, at offsets past everything the dead node handed out
        after = wait_until(lambda: _produce(client, partition), 30, "a write to the rebuilt partition")
        assert after == marker["start_offset"]
        merged = partitions_of(client.status(), TOPIC)[partition]
        assert merged["rebuilt"]["lost_offsets"] == [[0, 4]] and merged["high_watermark"] == after + 1
        # the log says it loudly: the metadata leader at ERROR, every survivor at WARNING
        logs = "".join(n.log_text() for n in survivors)
        assert f"{TOPIC}/{partition}: every replica ({holder}) was removed for good" in logs
        assert f"{TOPIC}/{partition} was rebuilt empty on" in logs and "offsets 0..4 are lost" in logs
    finally:
        client.stop()


def _produce(client: meshq.Node, partition: int) -> int | None:
    try:
        return client.produce(TOPIC, b"after", partition=partition, timeout=3.0).offset
    except meshq.MeshqError:
        return None  # the client still routes to the dead node; it refreshes its metadata and retries
