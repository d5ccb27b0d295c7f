"""The ``groups`` room (meshq.core.partitions.groups): committed offsets of consumer groups."""

from __future__ import annotations

import msgpack

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.events import CommitOffsets, RequestReceived
from meshq.core.hashing import stable_hash64
from meshq.log.memory import MemoryStorage
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, answers, create_topic, error_of


def commit(h: CoreHarness, group: str, offsets: dict, request_id: int = 77) -> wire.Message | None:
    entries = [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(offsets.items())]
    return h.request("offset_commit", {"group": group, "offsets": entries}, request_id=request_id)


def committed(h: CoreHarness, group: str, topic: str) -> dict:
    reply = h.request("offset_fetch", {"group": group, "topic": topic})
    assert reply.type == "offset_fetch_ok", reply
    return {(e["topic"], e["partition"]): e["offset"] for e in reply.body["offsets"]}


def coordinator(partitions: int = 4, **config) -> CoreHarness:
    """A lone storage node holding the offsets topic."""
    h = CoreHarness("n1", partitions=partitions, **config)
    h.request("metadata", {"topics": [OFFSETS_TOPIC], "auto_create": False})
    assert OFFSETS_TOPIC in h.core.topics
    return h


def offsets_log_end(h: CoreHarness, group: str) -> int:
    return h.core.partitions[(OFFSETS_TOPIC, h.core.groups.offsets_partition(group))].log.end_offset


def test_a_group_is_coordinated_by_a_stable_hash_of_its_name_over_the_offsets_partitions():
    h = coordinator(partitions=4)
    for group in ("g", "orders", "billing"):
        assert h.core.groups.offsets_partition(group) == stable_hash64(group.encode()) % 4


def test_a_commit_writes_one_record_per_partition_into_the_groups_offsets_partition_and_is_read_back():
    h = coordinator()
    assert commit(h, "g", {("t", 0): 3, ("t", 1): 5, ("u", 0): 1}).type == "offset_commit_ok"
    state = h.core.partitions[(OFFSETS_TOPIC, h.core.groups.offsets_partition("g"))]
    records = batch_format.decode_records(state.log.read(0, 1 << 20), OFFSETS_TOPIC, state.partition)
    assert [(msgpack.unpackb(r.key), msgpack.unpackb(r.value)) for r in records] == [
        (["g", "t", 0], 3), (["g", "t", 1], 5), (["g", "u", 0], 1)]
    assert committed(h, "g", "t") == {("t", 0): 3, ("t", 1): 5}
    commit(h, "g", {("t", 0): 9})
    assert committed(h, "g", "t") == {("t", 0): 9, ("t", 1): 5}  # the latest commit wins


def test_offsets_are_kept_apart_by_group_and_by_topic():
    h = coordinator()
    commit(h, "g", {("t", 0): 3})
    commit(h, "other", {("t", 0): 7})
    assert committed(h, "g", "t") == {("t", 0): 3}
    assert committed(h, "other", "t") == {("t", 0): 7}
    assert committed(h, "g", "u") == {}


def test_an_empty_commit_is_answered_without_writing_anything():
    h = coordinator()
    end = offsets_log_end(h, "g")
    assert commit(h, "g", {}).type == "offset_commit_ok"
    assert offsets_log_end(h, "g") == end


def test_a_commit_to_a_node_that_cannot_coordinate_the_group_is_refused_and_stores_nothing(lone, client):
    assert error_of(commit(lone, "g", {("t", 0): 1})) == (
        "unknown_topic", "topic '__consumer_offsets' does not exist (as far as n1 knows)")
    assert error_of(commit(client, "g", {("t", 0): 1})) == ("not_leader", "node c1 is a client and leads no partition")
    assert lone.core.groups.group_offsets == {}


def test_a_commit_is_answered_only_once_a_majority_of_the_offsets_replicas_holds_it():
    net = Net("n1", "n2", partitions=1, replication_factor=2)
    net.form()
    net["n1"].request("metadata", {"topics": [OFFSETS_TOPIC], "auto_create": False})
    net.run(1.0)
    leader = net[net["n1"].core.partitions[(OFFSETS_TOPIC, 0)].replica.leader]
    net.cut(*(n for n in net.nodes if n != leader.core.node_id))
    answers(leader)
    assert commit(leader, "g", {("t", 0): 4}) is None
    net.run(0.5)
    assert answers(leader) == {}
    net.heal()
    net.run(0.3)
    assert answers(leader)[77].type == "offset_commit_ok"


def test_losing_leadership_of_an_offsets_partition_drops_its_groups_and_regaining_it_replays_them():
    h = coordinator(partitions=4)
    assert h.core.groups.offsets_partition("g") != h.core.groups.offsets_partition("other")
    commit(h, "g", {("t", 0): 3})
    commit(h, "other", {("t", 0): 7})
    key = (OFFSETS_TOPIC, h.core.groups.offsets_partition("g"))
    h.core.groups.on_leadership(key, False)
    assert h.core.groups.group_offsets == {("other", "t", 0): 7}
    h.core.groups.on_leadership(key, True)
    assert h.core.groups.group_offsets == {("g", "t", 0): 3, ("other", "t", 0): 7}


def test_lag_is_the_distance_from_the_committed_offset_to_the_high_watermark():
    h = coordinator()
    create_topic(h, "t", 2)
    h.produce("t", [b"a", b"b", b"c"], partition=1)
    commit(h, "g", {("t", 1): 1, ("t", 0): 0})
    assert h.core.groups.lag_report() == [{"group": "g", "mode": "stream", "generation": 0, "state": "empty",
                                           "members": [], "partitions": [
        {"topic": "t", "partition": 0, "committed": 0, "high_watermark": 0, "lag": 0},
        {"topic": "t", "partition": 1, "committed": 1, "high_watermark": 3, "lag": 2}]}]


def test_a_stored_record_that_is_not_a_commit_does_not_stop_a_coordinator_from_taking_over():
    # (A produce to the offsets topic is refused now; records an older release let through are skipped.)
    storage = MemoryStorage()
    h = coordinator(partitions=1, storage=storage)
    commit(h, "g", {("t", 0): 3})
    # a record that is not a commit, as an older release let a plain produce store there
    state = h.core.partitions[(OFFSETS_TOPIC, 0)]
    junk = batch_format.stamp(batch_format.encode_batch([(None, b"junk", None, 1)]), state.log.end_offset, 1)
    state.append(junk, batch_format.parse_header(junk), 1)
    h.sync(list(h.core.partitions))
    again = CoreHarness("n1", storage=storage, partitions=1)  # takes over the partition: replays it
    assert again.core.groups.group_offsets == {("g", "t", 0): 3}


def test_a_deposed_coordinator_that_has_not_learnt_it_yet_refuses_to_read_offsets_rather_than_go_back():
    # A coordinator paused (or cut off) long enough for another replica to take over still thinks
    # it leads when it resumes: its in-memory offsets miss the commits made since. Reading them
    # would take an acknowledged commit back (seen in the simulator under pauses: "committed
    # offset went back from 82 to 78"); like a write, a read needs the leader's lease.
    net = Net("n1", "n2", "n3", partitions=1, replication_factor=3)
    net.form()
    net["n1"].request("metadata", {"topics": [OFFSETS_TOPIC], "auto_create": False})
    net.run(1.0)
    old = net[net["n1"].core.partitions[(OFFSETS_TOPIC, 0)].replica.leader]
    commit(old, "g", {("t", 0): 78})
    net.run(0.3)
    assert answers(old)[77].type == "offset_commit_ok"
    paused = net.nodes.pop(old.core.node_id)  # a paused process: no timer fires, nothing arrives
    rest = list(net.nodes.values())
    net.run_until(lambda: any(h.core.partitions[(OFFSETS_TOPIC, 0)].replica.is_leader for h in rest), 30.0)
    new = next(h for h in rest if h.core.partitions[(OFFSETS_TOPIC, 0)].replica.is_leader)
    commit(new, "g", {("t", 0): 82})
    net.run(0.3)
    assert answers(new)[77].type == "offset_commit_ok"
    assert committed(new, "g", "t") == {("t", 0): 82}
    net.nodes[paused.core.node_id] = paused  # it resumes and is asked before it hears of the new leader
    assert paused.core.partitions[(OFFSETS_TOPIC, 0)].replica.is_leader
    reply = paused.request("offset_fetch", {"group": "g", "topic": "t"})
    assert reply.type != "offset_fetch_ok" or reply.body["offsets"] != [{"topic": "t", "partition": 0, "offset": 78}]
    assert error_of(reply)[0] == "not_enough_replicas"
    net.run_until(lambda: not paused.core.partitions[(OFFSETS_TOPIC, 0)].replica.is_leader, 30.0)
    net.run(0.5)
    assert committed(new, "g", "t") == {("t", 0): 82}


def ordered_commit(h: CoreHarness, offsets: dict, seq: int, request_id: int, sender: str = "c1",
                   session: int = 5) -> wire.Message | None:
    entries = [{"topic": t, "partition": p, "offset": o} for (t, p), o in sorted(offsets.items())]
    before = len(h.replies)
    h.handle(RequestReceived(b"peer", wire.Message("offset_commit", sender, request_id, {
        "group": "g", "offsets": entries, "session": session, "seq": seq})))
    return wire.decode(h.replies[-1].frames, h.config.cluster) if len(h.replies) > before else None


def test_an_attempt_delayed_past_a_later_commit_of_the_same_committer_does_not_take_the_offset_back():
    # Seen in the simulator ("committed offset of events/0 went back from 101 to 88"): the first
    # attempt of commit 88 was held on the wire, its retry was answered, commit 101 followed and
    # was answered, then the first attempt arrived and was stored over it.
    h = coordinator()
    end = offsets_log_end(h, "g")
    assert ordered_commit(h, {("t", 0): 88}, seq=1, request_id=1).type == "offset_commit_ok"  # the retry
    assert ordered_commit(h, {("t", 0): 101, ("t", 1): 7}, seq=2, request_id=2).type == "offset_commit_ok"
    stored = offsets_log_end(h, "g")
    # the delayed first attempt: answered (a later commit of its committer superseded it), nothing stored
    assert ordered_commit(h, {("t", 0): 88}, seq=1, request_id=3).type == "offset_commit_ok"
    assert offsets_log_end(h, "g") == stored > end
    assert committed(h, "g", "t") == {("t", 0): 101, ("t", 1): 7}
    # only the entries a later commit set are superseded: another partition of an older commit is stored
    assert ordered_commit(h, {("t", 0): 90, ("t", 2): 4}, seq=1, request_id=4).type == "offset_commit_ok"
    assert committed(h, "g", "t") == {("t", 0): 101, ("t", 1): 7, ("t", 2): 4}
    # another committer, or the same node restarted (a new incarnation), is not ordered against these
    ordered_commit(h, {("t", 0): 50}, seq=1, request_id=5, sender="c2")
    assert committed(h, "g", "t")[("t", 0)] == 50
    ordered_commit(h, {("t", 0): 60}, seq=1, request_id=6, session=6)
    assert committed(h, "g", "t")[("t", 0)] == 60
    # a takeover forgets the order (kept in memory): the offsets themselves are replayed from the log
    key = (OFFSETS_TOPIC, h.core.groups.offsets_partition("g"))
    h.core.groups.on_leadership(key, False)
    assert h.core.groups.applied_seq == {}
    h.core.groups.on_leadership(key, True)
    assert committed(h, "g", "t") == {("t", 0): 60, ("t", 1): 7, ("t", 2): 4}


def test_every_attempt_of_one_commit_carries_the_same_order_and_the_next_commit_a_later_one():
    h = CoreHarness("c1", role="client")
    first = CommitOffsets("g", {("t", 0): 3}, deadline_s=h.clock.now_s + 5)
    second = CommitOffsets("g", {("t", 0): 4}, deadline_s=h.clock.now_s + 5)
    h.core.requests._cmd_commit(first, h.clock.now_s)
    h.core.requests._cmd_commit(first, h.clock.now_s)  # a command run again keeps its number
    h.core.requests._cmd_commit(second, h.clock.now_s)
    assert (first.seq, second.seq) == (1, 2)
