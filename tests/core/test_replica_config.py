"""Replica-set changes of one partition (meshq.core.replica, "Configuration changes"):
learners, configuration versions on every message, the establishment gate, a leader
dropped from the voters. Hand-pumped network from replica_harness; every run identical."""

from __future__ import annotations

from meshq.core.replica import FOLLOWER, LEADER
from tests.core.replica_harness import Cluster


def reconfigure(cl: Cluster, voters: list[str], learners: list[str], version: int, on: list[str] | None = None):
    """What applying a ``reassign`` metadata command does on each node (possibly not all at once)."""
    for node_id in on if on is not None else cl.ids:
        cl[node_id].set_config(voters, learners, version, cl.now)


def four() -> Cluster:
    """a, b, c replicate; d exists but holds no replica yet; a leads."""
    cl = Cluster(("a", "b", "c", "d"), replicas=["a", "b", "c"])
    cl.run_until(lambda: cl.leaders() == ["a"])
    return cl


def test_a_learner_copies_the_log_but_neither_votes_nor_counts():
    cl = four()
    end = cl.write("a", [b"r1", b"r2"])
    cl.pump()
    reconfigure(cl, ["a", "b", "c"], ["d"], 1)
    cl.advance(0.5)
    assert cl.nodes["d"].batches() == cl.nodes["a"].batches() and cl["d"].high_watermark == end
    assert cl["d"].next_deadline() == float("inf")  # never campaigns
    assert "d" not in cl["a"].in_sync(cl.now)
    # with b and c cut off, a + d are two nodes but only one voter: nothing commits
    cl.isolate("b")
    cl.isolate("c")
    cl.cut -= {("a", "d"), ("d", "a")}
    end2 = cl.write("a", [b"r3"])
    cl.advance(0.5)
    assert cl.nodes["d"].log.end_offset == end2
    assert cl["a"].high_watermark == end
    # and d grants no vote
    cl.inject("a", "d", "repl_vote", {"topic": "t", "partition": 0, "epoch": 9, "candidate": "a", "last_epoch": 9,
                                      "end_offset": 99, "pre_vote": False, "cv": 1})
    reply = [m for m in cl.sent if m.src == "d" and m.type == "repl_vote_ok"][-1]
    assert not reply.body["granted"]


def test_a_candidate_with_an_older_configuration_gets_no_vote():
    cl = four()
    reconfigure(cl, ["a", "b", "c"], [], 1, on=["b"])
    body = {"topic": "t", "partition": 0, "epoch": cl["b"].epoch + 1, "candidate": "c", "last_epoch": 5,
            "end_offset": 100, "pre_vote": False}
    cl.inject("c", "b", "repl_vote", {**body, "cv": 0})
    assert not [m for m in cl.sent if m.src == "b" and m.type == "repl_vote_ok"][-1].body["granted"]
    cl.inject("c", "b", "repl_vote", {**body, "cv": 1})
    assert [m for m in cl.sent if m.src == "b" and m.type == "repl_vote_ok"][-1].body["granted"]


def test_followers_that_know_a_newer_configuration_do_not_follow_an_older_leader():
    cl = four()
    end = cl.write("a", [b"r1"])
    cl.pump()
    reconfigure(cl, ["a", "b", "c"], [], 1, on=["b", "c"])  # a has not applied it yet
    cl.write("a", [b"r2"])
    cl.advance(0.5)
    assert cl["a"].high_watermark == end  # b and c refuse a's appends: nothing more commits
    cl.run_until(lambda: any(cl[n].role == LEADER for n in ("b", "c")))
    assert cl["a"].role == FOLLOWER
    # a now knows a newer version exists: until it applies it, it never campaigns (it could only disturb)
    epoch = cl.leader() and cl[cl.leader()].epoch
    cl.advance(5.0)
    assert cl["a"].role == FOLLOWER and cl[cl.leader()].epoch == epoch
    reconfigure(cl, ["a", "b", "c"], [], 1, on=["a"])
    cl.advance(5.0)
    cl.check_committed_agree()
    assert cl.nodes["a"].batches() == cl.nodes[cl.leader()].batches()


def test_the_next_step_waits_until_a_majority_acknowledged_the_version():
    cl = four()
    reconfigure(cl, ["a", "b", "c"], [], 1, on=["a"])
    cl.advance(0.5)
    assert not cl["a"].config_established()  # b and c answer with version 0
    reconfigure(cl, ["a", "b", "c"], [], 1, on=["b"])
    cl.advance(0.5)
    assert cl["a"].config_established()  # a and b: a majority


def test_a_leader_dropped_from_the_voters_hands_over_at_once():
    cl = four()
    end = cl.write("a", [b"r1", b"r2"])
    cl.pump()
    reconfigure(cl, ["b", "c"], [], 1)
    assert cl["a"].role == FOLLOWER
    handed = [m for m in cl.sent if m.src == "a" and m.type == "repl_timeout_now"]
    assert handed and handed[-1].dst in ("b", "c")
    cl.pump()
    assert cl.leaders() == [handed[-1].dst]  # no election timeout needed
    new = cl[handed[-1].dst]
    assert new.high_watermark >= end
    assert cl["a"].next_deadline() == float("inf")


def test_a_join_then_the_replaced_replica_leaves_without_losing_a_record():
    cl = four()
    written = [cl.write("a", [f"r{i}".encode()]) for i in range(20)]
    cl.pump()
    reconfigure(cl, ["a", "b", "c"], ["d"], 1)
    cl.advance(0.5)
    a = cl["a"]
    assert a.config_established() and "d" in a.caught_up(cl.now)
    reconfigure(cl, ["a", "b", "c", "d"], [], 2)
    cl.advance(0.5)
    assert a.config_established() and sorted(a.in_sync(cl.now)) == ["a", "b", "c", "d"]
    reconfigure(cl, ["a", "b", "d"], [], 3)
    cl.kill("c")  # the dropped replica is gone: a, b, d decide alone
    end = cl.write("a", [b"after"])
    cl.advance(0.5)
    assert a.high_watermark == end > written[-1]
    assert cl.nodes["d"].batches() == cl.nodes["a"].batches()
    assert "c" not in a.followers


def test_a_new_replica_starts_at_the_leaders_log_start_when_retention_deleted_the_beginning():
    cl = four()
    from meshq.log.memory import MemoryStorage

    for node in cl.nodes.values():  # small segments, so retention can delete some
        node.storage = MemoryStorage(segment_bytes=256)
        node.saved = None
        node.build()
    for node_id in cl.ids:
        cl.start(node_id)
    cl.run_until(lambda: len(cl.leaders()) == 1)
    leader = cl.leader()
    for i in range(40):
        cl.write(leader, [f"record-{i:03d}".encode()])
    cl.pump()
    removed = cl.nodes[leader].log.apply_retention(0, 600, None)
    start = cl.nodes[leader].log.start_offset
    assert removed and start > 0
    # d has nothing; what it misses first is gone from the leader: it restarts its copy at start
    voters = cl[leader].replicas
    reconfigure(cl, voters, ["d"], 1)
    cl.advance(1.0)
    d = cl.nodes["d"]
    assert d.log.start_offset == start and d.log.end_offset == cl.nodes[leader].log.end_offset
    assert d.batches() == cl.nodes[leader].batches()
    assert "d" in cl[leader].caught_up(cl.now)
    # restarting the replica (as after a crash) keeps the copy where it is
    cl.restart("d")
    assert cl.nodes["d"].log.start_offset == start


def test_no_hand_off_before_the_new_preferred_replica_knows_the_configuration_and_writes_go_on_meanwhile():
    cl = four()
    cl.write("a", [b"r1"])
    cl.advance(3.0)  # past the leader's settling time: it may hand over
    reconfigure(cl, ["b", "a", "c"], [], 1, on=["a"])  # b is preferred now, but b has not applied it
    cl.advance(2.0)
    # b would ignore a hand-off (older configuration) while a refused writes for an election timeout
    assert not [m for m in cl.sent if m.type == "repl_timeout_now"] and cl.leaders() == ["a"]
    assert cl["a"].lease_valid(cl.now) and not cl["a"].handing_off(cl.now)
    cl.write("a", [b"r2"])
    reconfigure(cl, ["b", "a", "c"], [], 1, on=["b", "c"])
    cl.run_until(lambda: cl.leaders() == ["b"], timeout_s=10.0)
    assert [m.dst for m in cl.sent if m.type == "repl_timeout_now"] == ["b"], "one hand-off, the one that works"
    cl.check_committed_agree()


def test_a_restarted_replica_keeps_the_newest_configuration_it_knew_while_metadata_replays():
    # A topic created while the cluster had one member: a alone, later b and c joined (version 2).
    # On a restart the metadata log replays from the start, so the partition is first opened with
    # the creation-time configuration (a alone). Campaigning with it would win alone, beside the
    # real leader of the same epoch (the simulator found this: seed 14).
    cl = four()
    reconfigure(cl, ["a", "b", "c"], [], 2)
    cl.advance(0.5)
    node = cl.nodes["a"]
    assert node.saved["cv"] == 2 and node.saved["voters"] == ["a", "b", "c"]
    node.replicas = ["a"]  # what the replayed metadata says first
    cl.kill("a")
    cl.run_until(lambda: any(cl[n].role == LEADER for n in ("b", "c")))
    epoch = max(cl[n].epoch for n in ("b", "c"))
    cl.revive("a")
    replica = cl.restart("a")
    assert replica.replicas == ["a", "b", "c"] and replica.config_version == 2 and replica.quorum == 2
    cl.advance(3.0)
    leaders_by_epoch = {}
    for n in cl.live():
        if cl[n].role == LEADER:
            assert leaders_by_epoch.setdefault(cl[n].epoch, n) == n
    assert cl[cl.leader()].epoch >= epoch
    # and an older step met later in the replay changes nothing
    replica.set_config(["a"], [], 1, cl.now)
    assert replica.replicas == ["a", "b", "c"]
