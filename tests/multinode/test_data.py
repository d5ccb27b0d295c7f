"""Data across real `meshq node` processes on 127.0.0.1 (SPEC §2 topics, §3.1, §3.5 placement).

Clients are in-process ``meshq.Node(role="client")`` objects seeded with ONE node each;
the nodes are separate processes. Per-node views come from ``tests.multinode.probe``.

Most tests here produce with ``acks="leader"``: they are about routing, placement and
topic configuration, not durability. ``acks="quorum"`` is the default (SPEC §3.1) and
``test_acks_quorum_record_survives_kill_9_of_its_leader`` holds it to account: a record
acknowledged by a majority of its replica set is read back from a survivor after kill -9
of its leader. Replication under faults (leader/follower crashes, SIGSTOP, repeated
restarts, torn tails; replicas byte-identical on disk) is in ``test_replication.py``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

import meshq
from tests.multinode.helpers import (
    describe,
    member_states,
    node_id,
    start_all,
    stop_cleanly,
    view,
    wait_agreement,
    wait_until,
)


def client(mesh, node) -> meshq.Node:
    """A client that knows only ``node`` (it may learn the rest of the mesh by itself).

    ``wait_ready`` as the CLI does: see ``test_admin_calls_right_after_start_wait_for_the_seed``.
    """
    c = meshq.Node(cluster=mesh.cluster, role="client", seeds=[node.seed], mdns=False).start()
    try:
        c.wait_ready(timeout=30)
    except BaseException:
        c.stop()
        raise
    return c


def read_all(consumer, expected: int, timeout_s: float) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        records.extend(consumer.poll(timeout=0.5, max_records=1000))
    # a short extra poll: anything beyond `expected` is a duplicate and must fail the test
    records.extend(consumer.poll(timeout=0.3, max_records=1000))
    return records


def topic_views(nodes, names) -> dict[str, dict] | None:
    """{node_id: {topic: (config, [replicas per partition])}} once every node knows every topic in ``names``."""
    out = {}
    for node in nodes:
        status = view(node)
        if status is None:
            return None
        topics = {t["name"]: (t["config"], [p["replicas"] for p in t["partitions"]]) for t in status["topics"]
                  if t["name"] in names}
        if set(topics) != set(names):
            return None
        out[status["node_id"]] = topics
    return out


def check_positions(records, acked: dict[tuple[int, int], bytes]) -> None:
    """Every acknowledged record read back once, at its acknowledged position, offsets dense and in order."""
    got = {(r.partition, r.offset): r.value for r in records}
    assert len(got) == len(records), "a record was delivered twice"
    missing = {pos: v for pos, v in acked.items() if got.get(pos) != v}
    assert not missing, f"{len(missing)} acknowledged records not read back, e.g. {list(missing.items())[:3]}"
    assert len(records) == len(acked), f"{len(records) - len(acked)} records nobody produced"
    by_partition: dict[int, list[int]] = defaultdict(list)
    for r in records:
        by_partition[r.partition].append(r.offset)
    for partition, offsets in by_partition.items():
        assert offsets == list(range(len(offsets))), f"partition {partition}: gap or reorder {offsets[:20]}..."


@pytest.mark.timeout(120)
def test_produce_through_one_node_consume_through_another(mesh):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=30)
    keys = [f"key-{k:02d}".encode() for k in range(40)]
    produced: dict[bytes, list[bytes]] = {k: [] for k in keys}
    acked: dict[tuple[int, int], bytes] = {}
    with client(mesh, nodes[0]) as producer:
        futures = []
        for i in range(2000):
            key = keys[i % len(keys)]
            value = b"%s-%05d" % (key, i)
            produced[key].append(value)
            futures.append((producer.produce_async("mn-orders", value, key=key, acks="leader"), value))
        producer.flush(timeout=30)
        for future, value in futures:
            md = future.result(0)
            acked[(md.partition, md.offset)] = value
    assert len(acked) == 2000

    with client(mesh, nodes[2]) as reader:
        consumer = reader.consumer("mn-orders", start="earliest")
        records = read_all(consumer, 2000, timeout_s=30)
        consumer.close()
    check_positions(records, acked)
    partition_of: dict[bytes, set[int]] = defaultdict(set)
    per_key: dict[bytes, list[bytes]] = defaultdict(list)
    for r in records:
        partition_of[r.key].add(r.partition)
        per_key[r.key].append(r.value)
    assert all(len(p) == 1 for p in partition_of.values()), "one key, one partition"
    assert per_key == produced, "per-key (so per-partition) order differs from the produce order"
    leaders = {p["leader"] for t in view(nodes[0])["topics"] if t["name"] == "mn-orders" for p in t["partitions"]}
    assert len(leaders) >= 2, f"the test should read from several leaders, not just {leaders}"
    # no false deaths under this load: every node still sees every other alive
    for node in nodes:
        states = member_states(view(node))
        assert all(states[node_id(n)] == "alive" for n in nodes), states


@pytest.mark.timeout(150)
def test_topic_configuration_is_agreed_everywhere_and_survives_restarting_every_node(mesh, timings):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=30)
    ids_before = [node_id(n) for n in nodes]
    names = {"mn-orders", "mn-ledger", "mn-auto"}
    acked: dict[str, dict[tuple[int, int], bytes]] = {name: {} for name in names}
    with client(mesh, nodes[1]) as admin:
        admin.create_topic("mn-orders", partitions=5, replication_factor=2, retention_ms=3_600_000,
                           retention_bytes=50_000_000)
        admin.create_topic("mn-ledger", partitions=3, replication_factor=3, retention_ms=None,
                           cleanup_policy="compact")
        batches = {
            "mn-orders": [(b"o%d" % (i % 7), b"order-%04d" % i) for i in range(500)],
            "mn-ledger": [(b"account-%03d" % i, b"balance-%03d" % i) for i in range(100)],  # unique keys
            "mn-auto": [(None, b"auto-%04d" % i) for i in range(200)],  # created on first produce
        }
        futures = [(name, admin.produce_async(name, value, key=key, acks="leader"), value)
                   for name, records in batches.items() for key, value in records]
        admin.flush(timeout=30)
        for name, future, value in futures:
            md = future.result(0)
            acked[name][(md.partition, md.offset)] = value

    before = wait_until(lambda: topic_views(nodes, names), 15, "every node to know every topic")
    reference = before[ids_before[0]]
    for nid, topics in before.items():
        assert topics == reference, f"{nid} disagrees on topic configuration or placement"
    assert reference["mn-orders"][0] == {"name": "mn-orders", "partitions": 5, "replication_factor": 2,
                                         "retention_bytes": 50_000_000, "retention_ms": 3_600_000,
                                         "cleanup_policy": "delete", "delete_retention_ms": 86_400_000}
    assert reference["mn-ledger"][0]["cleanup_policy"] == "compact"
    assert reference["mn-ledger"][0]["retention_ms"] is None
    assert reference["mn-auto"][0]["partitions"] == 8 and reference["mn-auto"][0]["replication_factor"] == 3

    problems = stop_cleanly(nodes)  # SIGTERM each; a clean stop exits 0
    assert not problems, "\n".join(problems)
    started = time.monotonic()
    start_all(nodes)  # same data directories, same ports
    assert [node_id(n) for n in nodes] == ids_before, "a restarted node must keep its id"
    wait_agreement(nodes, timeout_s=30)
    timings("full restart (3 nodes, SIGTERM) -> membership agreed again", time.monotonic() - started)
    after = wait_until(lambda: topic_views(nodes, names), 15, "every node to know every topic after restart")
    for nid, topics in after.items():
        assert topics == reference, f"after the restart {nid} has another topic configuration or placement"

    with client(mesh, nodes[2]) as reader:
        for name in sorted(names):
            consumer = reader.consumer(name, start="earliest")
            records = read_all(consumer, len(acked[name]), timeout_s=30)
            consumer.close()
            check_positions(records, acked[name])


@pytest.mark.timeout(120)
def test_five_nodes_spread_32_partitions_with_three_distinct_replicas_each(mesh, timings):
    first = mesh.start(1)[0]
    started = time.monotonic()
    nodes = [first, *mesh.start(4, seeds=[first])]
    views = wait_agreement(nodes, timeout_s=40)
    timings("5 nodes (4 joining through one seed) -> membership agreed", time.monotonic() - started)
    ids = set(views)
    assert len(ids) == 5
    with client(mesh, nodes[3]) as admin:
        config = admin.create_topic("mn-spread", partitions=32, replication_factor=3)
    assert (config.partitions, config.replication_factor) == (32, 3)
    placements = wait_until(lambda: topic_views(nodes, {"mn-spread"}), 15, "every node to know the topic")
    reference = placements[node_id(first)]["mn-spread"][1]
    for nid, topics in placements.items():
        assert topics["mn-spread"][1] == reference, f"{nid} computes another placement"
    assert len(reference) == 32
    for partition, replicas in enumerate(reference):
        assert len(replicas) == 3, f"partition {partition}: {replicas}"
        assert len(set(replicas)) == 3, f"partition {partition}: replicas are not distinct: {replicas}"
        assert set(replicas) <= ids, f"partition {partition}: replica outside the membership: {replicas}"

    def elected() -> list[dict] | None:  # each partition elects its leader (null until then) once the topic exists
        status = view(nodes[0])
        topic = next((t for t in (status or {}).get("topics", []) if t["name"] == "mn-spread"), None)
        if topic is None or any(p["leader"] is None for p in topic["partitions"]):
            return None
        return topic["partitions"]

    partitions = wait_until(elected, 30, "a leader for each of the 32 partitions")
    leaders = [p["leader"] for p in partitions]
    assert all(p["leader"] in p["replicas"] for p in partitions), (
        f"a leader must be one of its replicas: {[(p['leader'], p['replicas']) for p in partitions]}")
    assert len(set(leaders)) >= 3, f"leaders on only {sorted(set(leaders))}: {describe(nodes)}"
    holders = {member for replicas in reference for member in replicas}
    assert holders == ids, f"members holding no replica at all: {ids - holders}"
    print("leaders per member:", {m: leaders.count(m) for m in sorted(ids)})


@pytest.mark.timeout(60)
def test_admin_calls_wait_within_their_timeout_for_a_seed_that_comes_up_late(mesh):
    node = mesh.new()  # not started yet: its port is known
    with meshq.Node(cluster=mesh.cluster, role="client", seeds=[node.seed], mdns=False) as early:
        with ThreadPoolExecutor(2) as pool:
            created = pool.submit(early.create_topic, "mn-early", partitions=2, timeout=20)
            status = pool.submit(early.status, timeout=20)
            node.start()  # a second or so later
            assert created.result(25).partitions == 2
            assert node_id(node) in [m["node_id"] for m in status.result(25)["members"]]


@pytest.mark.timeout(120)
def test_acks_quorum_record_survives_kill_9_of_its_leader(mesh):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=30)
    with client(mesh, nodes[0]) as producer:
        producer.create_topic("mn-durable", partitions=1, replication_factor=3)
        md = producer.produce("mn-durable", b"must-survive", key=b"k", timeout=10)  # acks=quorum, the default
    leader = next(p["leader"] for t in view(nodes[0])["topics"] if t["name"] == "mn-durable" for p in t["partitions"])
    victim = next(n for n in nodes if node_id(n) == leader)
    victim.kill()
    survivor = next(n for n in nodes if n is not victim)
    with client(mesh, survivor) as reader:
        def read_back():
            try:
                consumer = reader.consumer("mn-durable", start="earliest", timeout=5)
            except meshq.MeshqError:
                return None
            try:
                return [r for r in consumer.poll(timeout=2) if r.offset == md.offset]
            except meshq.MeshqError:
                return None
            finally:
                consumer.close()

        (record,) = wait_until(read_back, 60, "the quorum-acknowledged record from a surviving replica", 0.5)
    assert record.value == b"must-survive"
