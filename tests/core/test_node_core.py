"""NodeCore driven by hand: no sockets, no threads, no real time."""

from __future__ import annotations

import pytest

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.client.requests import FetchResult
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.events import (
    CommitOffsets,
    CreateTopic,
    EventReceived,
    Fetch,
    FetchCommitted,
    GetMetadata,
    RequestReceived,
)
from meshq.core.hashing import partition_for_key
from meshq.errors import NodeStoppedError, TimeoutError
from meshq.log.memory import MemoryStorage
from tests.core.harness import CoreHarness, pump


def read_all(h: CoreHarness, topic: str, partition: int) -> list:
    state = h.core.partitions[(topic, partition)]
    data = state.log.read(state.log.start_offset, 1 << 30)
    return batch_format.decode_records(data, topic, partition)


def produce_body(topic: str = "t", partition: int = 0, acks: str = "leader") -> dict:
    return {"topic": topic, "partition": partition, "acks": acks, "timeout_ms": 1000}


def idempotent_batch(values: list[bytes], producer_id: int = 42, base_sequence: int = 0) -> bytes:
    return batch_format.encode_batch([(None, v, None, 1) for v in values], producer_id=producer_id,
                                     producer_epoch=0, base_sequence=base_sequence)


def test_local_produce_then_fetch_round_trip():
    h = CoreHarness(partitions=4)
    outcome = h.produce("orders", [b"a", b"b", b"c"], partition=2)
    assert outcome.errors == []
    assert outcome.results == [("orders", 2, 0), ("orders", 2, 1), ("orders", 2, 2)]
    token = h.command(Fetch("orders", 2, 1, max_wait_s=0))
    result: FetchResult = h.resolved[token]
    records = batch_format.decode_records(result.data, "orders", 2, 1)
    assert [(r.offset, r.value) for r in records] == [(1, b"b"), (2, b"c")]
    assert result.high_watermark == 3


def test_topic_is_auto_created_with_defaults_and_persisted():
    storage = MemoryStorage()
    h = CoreHarness(storage=storage, partitions=3)
    h.produce("auto", [b"x"])
    assert h.core.topics["auto"].partitions == 3
    again = CoreHarness(storage=storage, partitions=9)
    assert again.core.topics["auto"].partitions == 3
    assert sorted(k for k in again.core.partitions if k[0] == "auto") == [("auto", 0), ("auto", 1), ("auto", 2)]


def test_keyed_records_land_on_their_stable_partition():
    h = CoreHarness(partitions=8)
    keys = [f"user-{i}".encode() for i in range(50)]
    outcome = h.produce("k", [b"v"] * 50, keys=keys)
    assert not outcome.errors
    for key in keys:
        partition = partition_for_key(key, 8)
        assert any(r.key == key for r in read_all(h, "k", partition))


def test_idempotent_retry_is_stored_once_and_returns_the_original_offset():
    h = CoreHarness()
    h.produce("t", [b"seed"], partition=0)  # offset 0 by another producer
    data = idempotent_batch([b"x", b"y"])
    first = h.request("produce", produce_body(), (data,))
    second = h.request("produce", produce_body(), (data,))
    assert first.body["base_offset"] == 1 and first.body["duplicate"] is False
    assert second.body["base_offset"] == 1 and second.body["duplicate"] is True
    assert [r.value for r in read_all(h, "t", 0)] == [b"seed", b"x", b"y"]


def create(h: CoreHarness, name: str = "t", partitions: int = 1) -> None:
    from meshq.config import TopicConfig

    token = h.command(CreateTopic(TopicConfig(name, partitions, 1)))
    assert token in h.resolved, h.failed


def test_sequence_gap_is_refused_without_changing_the_log():
    h = CoreHarness()
    create(h)
    h.request("produce", produce_body(), (idempotent_batch([b"a"], base_sequence=0),))
    reply = h.request("produce", produce_body(), (idempotent_batch([b"c"], base_sequence=5),))
    assert reply.type == "error" and reply.body["code"] == "out_of_order_sequence"
    assert [r.value for r in read_all(h, "t", 0)] == [b"a"]


def test_producer_dedupe_survives_a_restart():
    storage = MemoryStorage()
    h = CoreHarness(storage=storage)
    create(h)
    data = idempotent_batch([b"x"])
    h.request("produce", produce_body(), (data,))
    h.sync([("t", 0)])
    again = CoreHarness(storage=storage)
    reply = again.request("produce", produce_body(), (data,))
    assert reply.body["duplicate"] is True
    assert [r.value for r in read_all(again, "t", 0)] == [b"x"]


def test_corrupt_batch_gets_an_error_and_changes_nothing():
    h = CoreHarness()
    h.produce("t", [b"ok"], partition=0)
    data = bytearray(idempotent_batch([b"x"]))
    data[-1] ^= 0xFF
    reply = h.request("produce", produce_body(), (bytes(data),))
    assert reply.type == "error" and reply.body["code"] == "protocol"
    assert [r.value for r in read_all(h, "t", 0)] == [b"ok"]


def test_fsync_always_holds_the_ack_until_the_sync_completes():
    h = CoreHarness(fsync="always")
    h.auto_sync = False
    h.produce("t", [b"warm"], partition=0)  # creates the topic; its ack waits too
    h.sync([("t", 0)])
    reply = h.request("produce", produce_body(), (idempotent_batch([b"x"]),))
    assert reply is None, "acknowledged before fsync"
    assert h.syncs and ("t", 0) in h.syncs[-1].keys
    before = len(h.replies)
    h.sync([("t", 0)])
    assert len(h.replies) == before + 1


def test_group_commit_one_sync_covers_every_waiting_batch():
    h = CoreHarness(fsync="always")
    h.auto_sync = False
    h.produce("t", [b"warm"], partition=0)
    h.sync([("t", 0)])
    for sequence in range(5):
        h.request("produce", produce_body(), (idempotent_batch([b"v"], base_sequence=sequence),),
                  request_id=100 + sequence)
    before = len(h.replies)
    h.sync([("t", 0)])
    assert len(h.replies) == before + 5


def test_fetch_at_the_end_parks_until_data_arrives():
    h = CoreHarness()
    h.produce("t", [b"a"], partition=0)
    parked = h.request("fetch", {"topic": "t", "partition": 0, "offset": 1, "max_bytes": 1 << 20,
                                 "max_wait_ms": 5000}, request_id=9)
    assert parked is None
    before = len(h.replies)
    h.produce("t", [b"b"], partition=0)
    assert len(h.replies) == before + 1
    h.request("fetch", {"topic": "t", "partition": 0, "offset": 2, "max_bytes": 1 << 20, "max_wait_ms": 200},
              request_id=10)
    before = len(h.replies)
    h.advance(0.1)
    assert len(h.replies) == before
    h.advance(0.2)
    assert len(h.replies) == before + 1


def test_fetch_past_the_end_is_out_of_range_and_unknown_topic_is_reported():
    h = CoreHarness()
    h.produce("t", [b"a"], partition=0)
    reply = h.request("fetch", {"topic": "t", "partition": 0, "offset": 5, "max_bytes": 100, "max_wait_ms": 0})
    assert reply.body["code"] == "offset_out_of_range"
    reply = h.request("fetch", {"topic": "nope", "partition": 0, "offset": 0, "max_bytes": 100, "max_wait_ms": 0})
    assert reply.body["code"] == "unknown_topic"


def test_reserved_topic_names_are_refused():
    h = CoreHarness()
    outcome = h.produce("__secret", [b"x"])
    assert outcome.errors and "reserved" in str(outcome.errors[0])


def test_group_offsets_are_stored_in_the_offsets_topic_and_replayed_on_restart():
    storage = MemoryStorage()
    h = CoreHarness(storage=storage)
    h.produce("t", [b"a", b"b"], partition=1)
    token = h.command(CommitOffsets("g", {("t", 1): 2}))
    assert token in h.resolved
    token = h.command(FetchCommitted("g", "t"))
    assert h.resolved[token] == {("t", 1): 2}
    assert any(key[0] == OFFSETS_TOPIC for key in h.core.partitions)
    h.sync(list(h.core.partitions))
    again = CoreHarness(storage=storage)
    token = again.command(FetchCommitted("g", "t"))
    assert again.resolved[token] == {("t", 1): 2}
    lag = again.core.status.local_status()["groups"][0]["partitions"][0]
    assert lag == {"topic": "t", "partition": 1, "committed": 2, "high_watermark": 2, "lag": 0}


def test_client_core_produces_through_a_server_core_and_retries_a_lost_reply_exactly_once():
    server = CoreHarness("server", partitions=2)
    client = CoreHarness("client", role="client", data_dir=None, seeds=("127.0.0.1:9000",), request_timeout_s=1.0)
    pump(client, server)  # hello
    outcome = client.produce("t", [b"one", b"two"], partition=1, timeout_s=10.0)
    pump(client, server, rounds=1)  # metadata
    dropped = pump(client, server, drop_replies=1)  # the produce is stored but its reply is lost
    assert dropped == 1 and outcome.results == []
    client.advance(1.1)  # request timeout -> retry after a metadata refresh
    client.advance(0.3)
    pump(client, server)
    client.advance(0.3)
    pump(client, server)
    assert outcome.errors == []
    assert outcome.results == [("t", 1, 0), ("t", 1, 1)]
    assert [r.value for r in read_all(server, "t", 1)] == [b"one", b"two"]
    assert server.core.counters["duplicates_dropped"] == 2


def test_a_metadata_answer_another_waiter_dropped_again_is_asked_for_again():
    # Found by the simulator's calling threads: the metadata answer runs its waiters in order,
    # and a produce that finds no connected leader forgets the topic again before a later
    # GetMetadata waiter reads it (a KeyError inside the core, dropping the call's effects).
    server = CoreHarness("server", partitions=2)
    client = CoreHarness("client", role="client", data_dir=None, seeds=("127.0.0.1:9000",))
    pump(client, server)  # hello
    server.produce("t", [b"x"])  # the topic exists
    client.core.client.with_metadata("t", client.clock.now_s, client.clock.now_s + 5.0,
                                      lambda error: client.core.client.forget("t"))
    token = client.command(GetMetadata("t", refresh=True, auto_create=False))
    pump(client, server, rounds=1)  # the first answer: the earlier waiter forgets it again
    assert token not in client.resolved and token not in client.failed
    pump(client, server)  # asked again
    assert client.resolved[token]["config"].partitions == 2


def test_client_without_any_storage_node_times_out_with_a_clear_error():
    client = CoreHarness("lonely", role="client", data_dir=None)
    outcome = client.produce("t", [b"x"], timeout_s=1.0)
    client.advance(0.5)
    client.advance(0.6)
    assert outcome.errors and isinstance(outcome.errors[0], TimeoutError)
    assert "--seed" in str(outcome.errors[0])


def test_stop_fails_everything_still_waiting():
    server = CoreHarness("server")
    client = CoreHarness("client", role="client", data_dir=None, seeds=("127.0.0.1:9000",))
    pump(client, server)
    outcome = client.produce("t", [b"x"])
    client.apply(client.core.stop(client.clock.now_s))
    assert outcome.errors and isinstance(outcome.errors[0], NodeStoppedError)


@pytest.mark.parametrize("retention", [{"retention_bytes": 1}, {"retention_ms": 1}])
def test_retention_deletes_whole_sealed_segments(retention):
    storage = MemoryStorage(segment_bytes=4096)
    h = CoreHarness(storage=storage, retention_check_interval_s=1.0)
    from meshq.config import TopicConfig

    token = h.command(CreateTopic(TopicConfig("r", 1, 1, **retention)))
    assert token in h.resolved
    for _ in range(20):
        h.produce("r", [b"x" * 1000], partition=0)
    state = h.core.partitions[("r", 0)]
    assert state.log.start_offset == 0
    h.clock.wall_ms_value += 10_000
    h.advance(1.5)
    assert state.log.start_offset > 0
    assert state.log.end_offset == 20


def test_a_client_that_forgot_every_member_asks_its_seeds_again_with_backoff():
    # The client is cut off from its only storage node for longer than member_timeout_s: it
    # forgets it, and nothing but its seed list can bring it back. It asks the seed again with
    # growing but capped waits, and once the network heals it re-learns the member and produces.
    server = CoreHarness("server", partitions=2)
    client = CoreHarness("client", role="client", data_dir=None, seeds=("127.0.0.1:9000",), request_timeout_s=1.0,
                         member_timeout_s=5.0)
    pump(client, server)
    assert client.core.members.alive_ids("storage") == ["server"]
    seed_hellos = []
    for step in range(1, 241):  # 24 s cut off: every request is lost
        client.advance(0.1)
        for send in client.sent:
            if send.peer.startswith("seed:") and wire.decode(send.frames, client.config.cluster).type == "hello":
                seed_hellos.append(round(step * 0.1, 1))
        client.sent.clear()
    assert "server" not in client.core.members  # forgotten after member_timeout_s
    waits = [later - earlier for earlier, later in zip(seed_hellos, seed_hellos[1:])]
    assert len(seed_hellos) >= 5, seed_hellos
    assert waits[-1] > waits[0] and max(waits) <= 5.5, waits  # backs off, up to ~4 s x 1.25 (+ a heartbeat)
    while not any(send.peer.startswith("seed:") for send in client.sent):  # the network heals
        client.advance(0.1)
        client.sent[:] = [send for send in client.sent if send.peer.startswith("seed:")]
    pump(client, server)
    assert client.core.members.alive_ids("storage") == ["server"]
    outcome = client.produce("t", [b"back"], partition=1, timeout_s=10.0)
    for _ in range(5):
        pump(client, server)
        client.advance(0.3)
    assert outcome.errors == [] and outcome.results == [("t", 1, 0)]


def storage_heartbeat(node_id: str, port: int, leader: str | None) -> EventReceived:
    """A heartbeat from a storage member of a formed cluster that names ``leader``."""
    info = {"node_id": node_id, "address": f"tcp://127.0.0.1:{port}", "pub_address": f"tcp://127.0.0.1:{port + 1}",
            "role": "storage", "incarnation": 1}
    body = {"member": info, "members": [info], "formed": True, "leader": leader, "size": 2, "trivial": False,
            "can_form": False, "term": 1, "leads": [], "adverts": 0}
    return EventReceived(wire.Message("heartbeat", node_id, 0, body))


def join_targets(h: CoreHarness) -> list[str]:
    targets = [send.peer for send in h.sent if wire.decode(send.frames, h.config.cluster).type == "raft_join"]
    h.sent.clear()
    return targets


def test_a_joiner_moves_on_from_a_silent_join_target():
    # n9 hears of a formed cluster {a, b} whose heartbeats both name a as leader, then a falls
    # silent (b has not noticed yet). n9 must not ask a forever: after 2 x election_timeout_s
    # without a leader answering it asks b, which would forward the join to whoever leads.
    h = CoreHarness("n9", seeds=("127.0.0.1:9100",))  # a seed that never answers: n9 never forms alone
    h.handle(storage_heartbeat("a", 7000, "a"))
    h.handle(storage_heartbeat("b", 7010, "a"))
    assert join_targets(h) == ["a"]
    for _ in range(25):  # 2.5 s: less than failure_timeout_s, so a is only suspect, not dead
        h.advance(0.1)
        h.handle(storage_heartbeat("b", 7010, "a"))
    targets = join_targets(h)
    assert targets[0] == "a" and "b" in targets
    assert h.core.members.get("a").state == "suspect"


def test_a_joiner_moves_on_at_once_from_a_target_that_left_and_stays_with_a_leader_that_answers():
    h = CoreHarness("n9", seeds=("127.0.0.1:9100",))
    h.handle(storage_heartbeat("a", 7000, "a"))
    h.handle(storage_heartbeat("b", 7010, "a"))
    assert join_targets(h) == ["a"]
    h.handle(EventReceived(wire.Message("goodbye", "a", 0, {"node_id": "a", "incarnation": 1})))
    h.advance(0.35)
    assert join_targets(h) == ["b"]
    # b becomes leader and starts replicating the metadata log to n9: n9 keeps asking b.
    h.handle(RequestReceived(b"b", wire.Message("raft_append", "b", 0, {
        "term": 2, "leader": "b", "prev_index": -1, "prev_term": 0, "entries": [], "commit": -1})))
    for _ in range(10):
        h.advance(0.35)
        h.handle(storage_heartbeat("b", 7010, "b"))
        h.handle(RequestReceived(b"b", wire.Message("raft_append", "b", 0, {
            "term": 2, "leader": "b", "prev_index": -1, "prev_term": 0, "entries": [], "commit": -1})))
    assert set(join_targets(h)) == {"b"}


def test_a_node_that_holds_a_term_but_no_configuration_never_forms_a_cluster_of_its_own():
    # It was reached by a formed cluster (an append raised its term) before any entry arrived,
    # then forgot every member of it. Forming its own cluster now would start a second history
    # at a term already used (raft.bootstrap refuses): it keeps waiting to be admitted instead.
    storage = MemoryStorage()
    storage.write_meta("raft", {"term": 1, "voted_for": None, "commit": -1})
    h = CoreHarness("n1", storage=storage)
    h.advance(5.0)
    assert not h.core.raft.formed and h.core.raft.term == 1
    h.handle(storage_heartbeat("a", 7000, "a"))
    h.advance(0.6)  # the next heartbeat tick
    assert join_targets(h) == ["a"]
