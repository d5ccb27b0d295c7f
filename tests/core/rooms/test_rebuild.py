"""Rebuilding a lost partition (``rebuild`` in meshq.core.metadata, ``Agreement.rebuild_lost``):
every replica removed for good -> recreated empty on its ring placement, writable again, its
offsets continuing after the last log end offset its leaders reported."""

from __future__ import annotations

from meshq.core.metadata import REBUILD_GAP as GAP
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, batch, create_topic, error_of, produce_body


def fetch_body(offset: int, partition: int) -> dict:
    return {"topic": "t", "partition": partition, "offset": offset, "max_bytes": 1 << 20, "max_wait_ms": 0}


def lose_a_partition(replication_factor: int) -> tuple[Net, CoreHarness, int, list[str]]:
    """n1..n3 (member_timeout_s 5) with topic ``t`` of six partitions; one partition none of whose
    replicas is the metadata leader gets three records; then every replica of it is cut off.
    Returns (net, metadata leader, that partition, its old replicas)."""
    net = Net("n1", "n2", "n3", member_timeout_s=5.0)
    leader = net.form()
    create_topic(leader, "t", 6, replication_factor=replication_factor, net=net)
    meta = leader.core.meta
    partition = next(p for p in range(6) if leader.core.node_id not in meta.replicas("t", p))
    replicas = list(meta.replicas("t", partition))
    owner = net[replicas[0]]
    key = ("t", partition)
    net.run_until(lambda: key in owner.core.partitions and owner.core.partitions[key].replica.is_leader, within_s=5.0)
    net.run(1.0)  # a heartbeat reports the empty log: growth between reports is then what was written
    for i in range(3):
        token = owner.request("produce", produce_body("t", partition, acks="quorum"),
                              (batch([b"v%d" % i], base_sequence=i),), request_id=100 + i)
        net.pump()
        assert token is not None or any(r for r in owner.replies)
    net.run(1.5)  # heartbeats carry the leader's log end offset to every node
    assert leader.core.agreement.known_ends[key][1:] == (3, 3)  # end 3, grown by 3 since the previous report
    net.cut(*replicas)
    return net, leader, partition, replicas


def test_a_partition_whose_only_replica_was_removed_for_good_is_rebuilt_writable_after_its_last_offset():
    net, leader, partition, (old,) = lose_a_partition(1)
    key = ("t", partition)
    net.run(4.0)
    assert key not in leader.core.meta.rebuilds  # down, not yet removed for good: nothing is rebuilt
    net.run_until(lambda: key in leader.core.meta.rebuilds, within_s=10.0)
    meta = leader.core.meta
    assert old not in meta.members
    rebuild = meta.rebuilds[key]
    # past the last reported end (3) by the gap: whatever the leader handed out after its last
    # report is never handed out again
    assert (rebuild["first"], rebuild["end"], rebuild["start"]) == (0, 3, 3 + GAP)
    (new,) = meta.replicas(*key)
    assert new != old and [new] == meta.target(*key)
    replica = net[new]
    net.run_until(lambda: key in replica.core.partitions and replica.core.partitions[key].replica.is_leader,
                  within_s=5.0)
    state = replica.core.partitions[key]
    assert (state.log.start_offset, state.log.end_offset) == (3 + GAP, 3 + GAP)
    assert state.replica.epoch > rebuild["epoch"] - 1  # elected above every epoch heard of
    reply = replica.request("produce", produce_body("t", partition), (batch([b"after"], producer_id=7),))
    assert reply.body["base_offset"] == 3 + GAP  # offsets continue; none below is handed out again
    code, message = error_of(replica.request("fetch", fetch_body(1, partition)))
    assert code == "offset_out_of_range"
    assert f"rebuilt empty from offset {3 + GAP}" in message and "offsets 0..2 are lost" in message
    status = replica.core.status.local_status()
    entry = next(p for t in status["topics"] if t["name"] == "t" for p in t["partitions"] if p["partition"] == partition)
    assert entry["rebuilt"] == {"epoch": rebuild["epoch"], "start_offset": 3 + GAP, "reported_end": 3,
                                "lost_offsets": [[0, 2]], "unknown_offsets": [[3, 2 + GAP]]}
    # every partition that was only on the removed node is rebuilt, no other; every member agrees
    held = [("t", p) for p in range(6) if meta.rebuilds.get(("t", p)) or old in meta.replicas("t", p)]
    net.run_until(lambda: len(meta.rebuilds) == len(held), within_s=5.0)
    assert sorted(meta.rebuilds) == held and not any(old in meta.replicas(*k) for k in held)
    net.run_until(lambda: all(h.core.meta.rebuilds == meta.rebuilds for node_id, h in net.nodes.items()
                              if node_id != old), within_s=5.0)


def test_a_partition_with_both_replicas_removed_for_good_is_rebuilt_on_the_remaining_placement():
    net = Net("n1", "n2", "n3", "n4", "n5", member_timeout_s=5.0)
    leader = net.form()
    create_topic(leader, "t", 6, replication_factor=2, net=net)
    meta = leader.core.meta
    partition = next(p for p in range(6) if leader.core.node_id not in meta.replicas("t", p))
    key = ("t", partition)
    replicas = list(meta.replicas(*key))
    net.run_until(lambda: any(key in net[n].core.partitions and net[n].core.partitions[key].replica.is_leader
                              for n in replicas), within_s=5.0)
    first = next(net[n] for n in replicas if net[n].core.partitions[key].replica.is_leader)
    net.run(1.0)
    for i in range(2):
        first.request("produce", produce_body("t", partition, acks="quorum"), (batch([b"v%d" % i], base_sequence=i),))
        net.pump()
    net.run(1.5)
    net.cut(*replicas)  # three of five stay: the metadata group removes both, one after the other
    net.run_until(lambda: key in leader.core.meta.rebuilds, within_s=20.0)
    assert not set(replicas) & set(leader.core.meta.members)
    rebuild = leader.core.meta.rebuilds[key]
    assert (rebuild["end"], rebuild["start"]) == (2, 2 + GAP)
    new = leader.core.meta.replicas(*key)
    assert len(new) == 2 and not set(new) & set(replicas)
    net.run_until(lambda: any(key in net[n].core.partitions and net[n].core.partitions[key].replica.is_leader
                              for n in new), within_s=5.0)
    now_leader = next(net[n] for n in new if net[n].core.partitions[key].replica.is_leader)
    token = now_leader.request("produce", produce_body("t", partition, acks="quorum"),
                               (batch([b"after"], producer_id=9),), request_id=501)
    assert token is None  # answered once the other new replica holds it
    net.run_until(lambda: any(r for r in now_leader.replies), within_s=5.0)
    assert now_leader.core.partitions[key].high_watermark == 3 + GAP
    follower = net[next(n for n in new if net[n] is not now_leader)]
    assert (follower.core.partitions[key].log.start_offset, follower.core.partitions[key].log.end_offset) == (2 + GAP, 3 + GAP)


def test_a_producer_known_to_the_lost_log_continues_its_sequence_on_the_rebuilt_one():
    net, leader, partition, (old,) = lose_a_partition(1)
    key = ("t", partition)
    net.run_until(lambda: key in leader.core.meta.rebuilds, within_s=15.0)
    (new,) = leader.core.meta.replicas(*key)
    replica = net[new]
    net.run_until(lambda: key in replica.core.partitions and replica.core.partitions[key].replica.is_leader,
                  within_s=5.0)
    # producer 42 wrote sequences 0..2 to the lost log: its next batch (sequence 3) is taken, in order
    reply = replica.request("produce", produce_body("t", partition), (batch([b"v3"], base_sequence=3),))
    assert reply.body["base_offset"] == 3 + GAP
    reply = replica.request("produce", produce_body("t", partition), (batch([b"v3"], base_sequence=3),))
    assert reply.body["base_offset"] == 3 + GAP  # a retry of it is the same batch, stored once
    assert error_of(replica.request("produce", produce_body("t", partition), (batch([b"v1"], base_sequence=1),)))[0] \
        == "out_of_order_sequence"  # an older batch arriving late is refused, never stored after a newer one


def test_a_removed_replica_that_comes_back_stops_leading_once_it_hears_the_rebuilt_leader():
    net, leader, partition, (old,) = lose_a_partition(1)
    key = ("t", partition)
    net.run_until(lambda: key in leader.core.meta.rebuilds, within_s=15.0)
    (new,) = leader.core.meta.replicas(*key)
    net.run_until(lambda: key in net[new].core.partitions and net[new].core.partitions[key].replica.is_leader,
                  within_s=5.0)
    zombie = net[old].core.partitions[key].replica
    assert zombie.is_leader  # cut off, it never learned it was removed: its old copy still leads there
    net.heal(old)
    net.run_until(lambda: not zombie.is_leader, within_s=3.0)
    assert net[new].core.partitions[key].replica.is_leader
    # it rejoins: applying the rebuild deletes its old copy; where the ring places the partition
    # now, every copy starts at the rebuild's start — no offset below it is served or handed out
    start = leader.core.meta.rebuilds[key]["start"]

    def settled() -> bool:
        holders = [h for h in net.nodes.values() if key in h.core.partitions]
        return (bool(holders) and sorted(h.core.node_id for h in holders) == sorted(leader.core.meta.replicas(*key))
                and any(h.core.partitions[key].replica.is_leader for h in holders))

    net.run_until(settled, within_s=30.0)
    assert not zombie.is_leader
    for h in net.nodes.values():
        if key in h.core.partitions:
            assert h.core.partitions[key].log.start_offset == start, h.core.node_id
