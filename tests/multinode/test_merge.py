"""Two clusters of one name formed apart on real processes, then joined (issue #19 item 7; docs/operations.md,
"Two clusters of the same name").

Group A (2 nodes) and group B (3 nodes) are started apart, each seeded only within itself, so each forms its own
cluster of the same name. A third party then joins the networks: a storage node seeded with one node of each group.
Its gossip introduces the groups to each other, and a cluster that holds nothing gives itself up: when A holds a
topic, B joins A and A's records stay readable; when neither holds anything, one of them (the formation that sorts
first stays) joins the other. Either way the six nodes end up as one agreed membership. Processes are killed by PID
and their directories removed by the ``mesh`` fixture, pass or fail.
"""

from __future__ import annotations

import time

import pytest

import meshq
from tests.multinode.helpers import node_id, view, wait_agreement, wait_until

pytestmark = pytest.mark.timeout(180)


def formation_of(node) -> str:
    status = view(node)
    return "" if status is None else status.get("metadata", {}).get("formation", "")


def two_groups(mesh):
    a = mesh.start(1)
    a += mesh.start(1, seeds=a)
    b = mesh.start(1)
    b += mesh.start(2, seeds=b[:1])
    wait_agreement(a, timeout_s=30)
    wait_agreement(b, timeout_s=30)
    assert formation_of(a[0]) and formation_of(b[0]) and formation_of(a[0]) != formation_of(b[0]), \
        "the two groups should have formed two clusters"
    return a, b


def test_a_cluster_holding_nothing_joins_the_one_holding_a_topic(mesh, timings):
    a, b = two_groups(mesh)
    with meshq.Node(cluster=mesh.cluster, role="client", seeds=[a[0].seed], mdns=False).start() as writer:
        writer.wait_ready(timeout=30)
        writer.create_topic("mn-merge", partitions=2, replication_factor=2)
        for i in range(20):
            writer.produce("mn-merge", f"r{i}".encode(), key=f"k{i}".encode(), timeout=10)
    kept = formation_of(a[0])
    started = time.monotonic()
    bridge = mesh.start(1, seeds=[a[0], b[0]])
    nodes = [*a, *b, *bridge]
    wait_agreement(nodes, timeout_s=90)
    timings("two clusters (2 + 3 nodes, A holding a topic) joined by a bridge -> one membership",
            time.monotonic() - started)
    assert {formation_of(n) for n in nodes} == {kept}, "B (holding nothing) should have joined A"
    with meshq.Node(cluster=mesh.cluster, role="client", seeds=[b[0].seed], mdns=False).start() as reader:
        reader.wait_ready(timeout=30)
        consumer = reader.consumer("mn-merge", start="earliest", timeout=5)
        records = []
        wait_until(lambda: records.extend(consumer.poll(timeout=0.5, max_records=100)) or len(records) >= 20, 30,
                   "A's records read through a node of B")
        assert sorted(r.value for r in records) == sorted(f"r{i}".encode() for i in range(20))


def test_two_clusters_holding_nothing_become_one(mesh, timings):
    a, b = two_groups(mesh)
    formations = {formation_of(a[0]), formation_of(b[0])}
    started = time.monotonic()
    bridge = mesh.start(1, seeds=[a[0], b[0]])
    nodes = [*a, *b, *bridge]
    views = wait_agreement(nodes, timeout_s=90)
    timings("two empty clusters (2 + 3 nodes) joined by a bridge -> one membership", time.monotonic() - started)
    assert {formation_of(n) for n in nodes} == {min(formations)}, "the formation that sorts first stays"
    assert sorted(next(iter(views.values()))["metadata"]["voters"]) == sorted(node_id(n) for n in nodes)
