"""The newest batches a replica keeps in memory (``PartitionState.read_recent``), from which a
leader sends what it just appended to its caught-up followers without reading its log back.

The cache must always equal the log's bytes at its offsets: through leader appends, follower
appends, truncation on failover, eviction and restart. ``Node.check_recent_matches_log`` in the
harness (also run by every ``check_committed_agree``) compares it with ``log.read``.
"""

from __future__ import annotations

from meshq.core import batch as batch_format
from meshq.core import partition as partition_module
from tests.core.replica_harness import Cluster


def settled() -> Cluster:
    cl = Cluster(seed=3)
    assert cl.leader() == "a"
    cl.advance(0.5)
    return cl


def test_replication_of_a_fresh_append_comes_from_memory():
    cl = settled()
    reads = []
    log = cl.nodes["a"].log
    original = log.read

    def counting_read(offset, max_bytes):
        reads.append(offset)
        return original(offset, max_bytes)

    log.read = counting_read
    end = cl.write("a", [b"one", b"two"])
    cl.pump()
    assert reads == []  # both followers got the batch without a read of the leader's log
    for node_id in ("b", "c"):
        assert cl.nodes[node_id].log.end_offset == end
    cl.check_committed_agree()


def test_recent_batches_follow_failover_truncation_and_restart():
    cl = settled()
    for i in range(5):
        cl.write("a", [f"r{i}".encode()])
    cl.advance(0.5)
    # A tail only on the old leader, which is then cut off: b takes over, a truncates on return.
    cl.cut |= {("a", "b"), ("a", "c")}
    cl.write("a", [b"only-on-a-1"])
    cl.write("a", [b"only-on-a-2"])
    cl.pump()
    for node in cl.nodes.values():
        node.check_recent_matches_log()
    cl.isolate("a")
    cl.run_until(lambda: cl["b"].is_leader or cl["c"].is_leader, timeout_s=10)
    new_leader = "b" if cl["b"].is_leader else "c"
    cl.advance(0.3)
    cl.write(new_leader, [b"after-failover"])
    cl.heal()
    cl.advance(1.0)
    assert cl.nodes["a"].truncations, "the old leader's tail was cut"
    assert cl.nodes["a"].state.read_recent(cl.nodes["a"].log.end_offset - 1, 1 << 20) is not None
    cl.check_committed_agree()
    for node in cl.nodes.values():
        assert node.batches() == cl.nodes[new_leader].batches()
    cl.restart("b")  # a restarted replica starts with nothing in memory and reads its log
    assert cl.nodes["b"].state.read_recent(0, 1 << 20) is None
    cl.advance(1.0)
    cl.check_committed_agree()


def test_only_the_newest_batches_are_kept(monkeypatch):
    monkeypatch.setattr(partition_module, "RECENT_BATCHES", 4)
    cl = settled()
    ends = [cl.write("a", [f"v{i}".encode()]) for i in range(10)]
    cl.pump()
    bases = [end - 1 for end in ends]  # one record per write
    state = cl.nodes["a"].state
    assert state.read_recent(bases[5], 1 << 20) is None  # evicted: only the last 4 batches stay
    data, base, next_offset = state.read_recent(bases[6], 1 << 20)
    assert (base, next_offset) == (bases[6], ends[-1])
    assert [h.base_offset for _pos, h in batch_format.iter_batches(data)] == bases[6:]
    one, _base, one_next = state.read_recent(bases[6], 1)
    assert one_next == ends[6] and len(list(batch_format.iter_batches(one))) == 1
    cl.check_committed_agree()


def test_a_batch_the_leader_cannot_read_is_retried_per_heartbeat_not_per_answer():
    """A follower needs a batch the leader cannot read (a damaged segment): the leader retries it
    at its heartbeats, not at once on every answer (which was a message storm: seed 2411)."""
    from meshq.errors import CorruptLogError

    cl = settled()
    cl.cut |= {("a", "c"), ("c", "a")}  # c falls behind
    for i in range(3):
        cl.write("a", [f"x{i}".encode()])
    cl.pump()
    leader = cl.nodes["a"]
    leader.state.read_recent = lambda offset, max_bytes: None  # not in memory: from the (damaged) file

    def damaged(offset, max_bytes):
        raise CorruptLogError(f"offset {offset} is in a damaged segment (test)")

    leader.log.read = damaged
    cl.heal()
    before = len(cl.sent)
    cl.advance(3.0)  # 20 heartbeat intervals of 0.15 s
    to_c = [m for m in cl.sent[before:] if m.src == "a" and m.dst == "c" and m.type == "repl_append"]
    assert 5 <= len(to_c) <= 25, len(to_c)  # about one per heartbeat
    assert all(not m.payloads for m in to_c)
    assert cl["a"].is_leader  # b keeps the quorum; nothing else is disturbed
