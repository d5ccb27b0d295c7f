"""Partition replication (meshq.core.replica.Replica) on a hand-driven network: seeded, fake
time, in-memory logs. See tests/core/replica_harness.py for the harness."""

from __future__ import annotations

import logging

import pytest

from meshq.core import batch as batch_format
from meshq.core import handoff
from meshq.core.handoff import SLOW_HOLD_DOWN_ELECTIONS, SLOW_MIN_LEAD_ELECTIONS, STABILITY_ELECTIONS
from meshq.core.replica import FOLLOWER, HW_SAVE_INTERVAL_S, LEADER, PRE_CANDIDATE
from meshq.errors import StorageFullError
from tests.core.replica_harness import PARTITION, TOPIC, WALL_MS, Cluster, Msg

ET = 1.0  # election timeout of the harness
HB = 0.15  # heartbeat interval of the harness
LAG = 3.0  # replica_lag_s of the harness
BIG = b"x" * 600_000  # two of these do not fit in one append (MAX_APPEND_BYTES is 1 MiB)


# ---------------------------------------------------------------------- helpers
def stamped(base: int, epoch: int, count: int = 1, value: bytes = b"v") -> bytes:
    """A batch as a leader of ``epoch`` would have stored it at ``base``."""
    data = batch_format.encode_batch([(None, value, None, WALL_MS)] * count)
    return batch_format.stamp(data, base, epoch)


def append_body(epoch: int, leader: str, prev_offset: int, prev_epoch: int, hw: int, epoch_start: int,
                cv: int = 0, log_start: int = 0) -> dict:
    return {"topic": TOPIC, "partition": PARTITION, "epoch": epoch, "leader": leader, "prev_offset": prev_offset,
            "prev_epoch": prev_epoch, "hw": hw, "epoch_start": epoch_start, "cv": cv, "log_start": log_start}


def vote_body(epoch: int, candidate: str, last_epoch: int, end_offset: int, pre_vote: bool, cv: int = 0) -> dict:
    return {"topic": TOPIC, "partition": PARTITION, "epoch": epoch, "candidate": candidate,
            "last_epoch": last_epoch, "end_offset": end_offset, "pre_vote": pre_vote, "cv": cv}


def last_sent(cl: Cluster, src: str, type_: str) -> Msg:
    return [m for m in cl.sent if m.src == src and m.type == type_][-1]


def values(cl: Cluster, node_id: str) -> list[bytes]:
    log = cl.nodes[node_id].log
    data = log.read(log.start_offset, 1 << 40)
    return [r.value for r in batch_format.decode_records(data, TOPIC, PARTITION)]


def settled(seed: int = 1, **kwargs) -> Cluster:
    """Three replicas a (preferred), b, c; a leads epoch 1 and every follower has heard from it."""
    cl = Cluster(seed=seed, **kwargs)
    assert cl.leader() == "a" and cl["a"].epoch == 1
    cl.advance(0.5)
    return cl


# ---------------------------------------------------------------------- 1. start-up
def test_preferred_replica_of_a_new_partition_campaigns_at_once_and_wins_epoch_1():
    cl = Cluster(start=False)
    now = cl.now
    for node_id in ("b", "c"):
        cl[node_id].start(now)
        assert cl[node_id].next_deadline() > now  # non-preferred replicas wait for a leader
    a = cl["a"]
    a.start(now)
    assert a.next_deadline() == now
    a.on_timer(now)
    assert a.role == PRE_CANDIDATE
    cl.pump()  # peers answer; no time passes
    assert cl.now == now
    assert a.role == LEADER and a.epoch == 1 and a.leader == "a"
    assert a.history == [[1, 0]] and a.epoch_start == 0
    for node_id in ("b", "c"):
        assert cl[node_id].epoch == 1 and cl[node_id].voted_for == "a" and cl[node_id].role == FOLLOWER
    cl.advance(0.2)
    assert [cl[n].leader for n in cl.ids] == ["a", "a", "a"]
    assert all(cl[n].history == [[1, 0]] for n in cl.ids)


def test_sole_replica_leads_at_once_and_commits_alone():
    cl = Cluster(["a"])
    a = cl["a"]
    assert a.role == LEADER and a.epoch == 1 and a.quorum == 1
    end = cl.write("a", [b"r1", b"r2"])
    assert a.high_watermark == end == 2
    assert a.reached("quorum", end, cl.now) and a.reached("all", end, cl.now)
    assert a.in_sync(cl.now) == ["a"]


# ---------------------------------------------------------------------- 2. replication and the high watermark
def test_records_reach_followers_byte_identically():
    cl = settled()
    ends = [cl.write("a", [b"one", b"two"]), cl.write("a", [b"three"]), cl.write("a", [b"four", b"five", b"six"])]
    cl.advance(0.5)
    leader_batches = cl.nodes["a"].batches()
    assert [(h.base_offset, h.leader_epoch, h.record_count) for h in cl.nodes["a"].headers()] == [
        (0, 1, 2), (2, 1, 1), (3, 1, 3)]
    for node_id in ("b", "c"):
        assert cl.nodes[node_id].batches() == leader_batches
        assert cl[node_id].high_watermark == ends[-1] == 6
        assert cl[node_id].history == [[1, 0]]
    assert values(cl, "c") == [b"one", b"two", b"three", b"four", b"five", b"six"]
    assert cl["a"].high_watermark == 6
    cl.check_committed_agree()


def test_high_watermark_advances_with_two_of_three():
    cl = settled()
    cl.isolate("c")
    end = cl.write("a", [b"r1", b"r2"])
    cl.pump()
    a = cl["a"]
    assert cl.nodes["b"].log.end_offset == end and cl.nodes["c"].log.end_offset == 0
    assert a.high_watermark == end
    assert a.reached("quorum", end, cl.now) and a.reached("leader", end, cl.now)
    assert not a.reached("all", end, cl.now)  # c is still in sync (heard from recently) and lacks the records
    cl.advance(0.3)
    assert cl["b"].high_watermark == end


def test_high_watermark_does_not_advance_without_a_majority():
    cl = settled()
    cl.isolate("a")
    end = cl.write("a", [b"r1"])
    cl.pump()
    a = cl["a"]
    assert a.high_watermark == 0
    assert a.reached("leader", end, cl.now)
    assert not a.reached("quorum", end, cl.now)
    assert not a.reached("all", end, cl.now)
    cl.heal()
    cl.advance(0.3)
    assert a.high_watermark == end and a.reached("quorum", end, cl.now)


# ---------------------------------------------------------------------- 3. acks=all and the in-sync set
def test_acks_all_waits_for_every_in_sync_follower():
    cl = settled()
    a = cl["a"]
    to_c = cl.hold(lambda m: m.src == "a" and m.dst == "c" and m.type == "repl_append")
    end = cl.write("a", [b"r"])
    cl.pump()
    assert a.high_watermark == end and a.reached("quorum", end, cl.now)
    assert a.in_sync(cl.now) == ["a", "b", "c"]
    assert not a.reached("all", end, cl.now)
    cl.release(to_c)
    cl.pump()
    assert a.reached("all", end, cl.now)


def test_silent_follower_leaves_in_sync_after_replica_lag_and_acks_all_completes():
    cl = settled()
    a = cl["a"]
    cl.cut |= {("a", "c"), ("c", "a")}
    end = cl.write("a", [b"r"])
    cl.pump()
    last = a.followers["c"].last_contact_s
    cl.advance(last + LAG - 0.05 - cl.now)
    assert a.is_leader and "c" in a.in_sync(cl.now)
    assert not a.reached("all", end, cl.now)
    cl.advance(0.1)
    assert a.is_leader and a.in_sync(cl.now) == ["a", "b"]
    assert a.reached("all", end, cl.now)
    assert a.epoch == 1  # c's lonely campaigns (pre-votes) did not disturb anyone


# ---------------------------------------------------------------------- 4. failover
def test_failover_elects_most_complete_follower_and_old_leader_tail_is_replaced():
    cl = settled()
    r1 = cl.write("a", [b"r1"])
    cl.advance(0.5)
    old_hw = cl["a"].high_watermark
    assert old_hw == r1 and all(cl[n].high_watermark == r1 for n in cl.ids)
    committed = cl.nodes["a"].batches_below(old_hw)
    # r2 reaches b only, and b's answer is lost: not committed, but b's log is the most complete.
    cl.cut |= {("a", "c"), ("b", "a"), ("c", "a")}
    r2 = cl.write("a", [b"r2"])
    cl.pump()
    assert cl.nodes["b"].log.end_offset == r2 and cl.nodes["c"].log.end_offset == r1
    assert cl["a"].high_watermark == r1
    # r3 stays on a alone: its appends are delayed and a freezes (a paused process).
    from_a = cl.hold(lambda m: m.src == "a")
    r3 = cl.write("a", [b"r3-only-on-a"])
    cl.pump()
    cl.paused.add("a")
    cl.run_until(lambda: cl["b"].is_leader, timeout_s=10)
    b = cl["b"]
    assert b.epoch == 2 and b.epoch_start == r2 and b.history == [[1, 0], [2, r2]]
    assert cl["c"].role == FOLLOWER and cl["c"].voted_for == "b"
    cl.advance(0.3)
    r4 = cl.write("b", [b"r4"])
    cl.advance(0.3)
    assert cl.nodes["c"].batches() == cl.nodes["b"].batches()
    assert b.high_watermark == r4
    # The old leader wakes up; its delayed appends of epoch 1 are refused with epoch 2.
    a = cl["a"]
    assert a.role == LEADER and a.epoch == 1 and a.log.end_offset == r3
    cl.paused.discard("a")
    cl.heal()
    cl.release(from_a)
    cl.pump()
    assert a.role == FOLLOWER and a.epoch == 2
    cl.advance(0.5)
    assert cl.nodes["a"].batches() == cl.nodes["b"].batches()
    assert b"r3-only-on-a" not in values(cl, "a")
    assert values(cl, "a") == [b"r1", b"r2", b"r4"]
    assert a.history == [[1, 0], [2, r2]] and a.leader == "b" and a.high_watermark == r4
    assert cl.nodes["a"].truncations == [r2]  # only the uncommitted tail, never below the old HW
    assert all(offset >= old_hw for n in cl.ids for offset in cl.nodes[n].truncations)
    assert cl.nodes["a"].batches_below(old_hw) == committed
    cl.check_committed_agree()


# ---------------------------------------------------------------------- 5. votes
def test_vote_refused_to_candidate_with_shorter_log():
    cl = settled()
    cl.write("a", [b"r1"])
    cl.write("a", [b"r2"])
    cl.advance(0.3)
    cl.inject("c", "b", "repl_vote", vote_body(2, "c", last_epoch=1, end_offset=1, pre_vote=False))
    reply = last_sent(cl, "b", "repl_vote_ok")
    assert reply.dst == "c" and not reply.body["granted"] and reply.body["for_epoch"] == 2
    assert cl["b"].voted_for is None
    # control: an equally complete candidate gets the vote of the same epoch
    cl.inject("c", "b", "repl_vote", vote_body(2, "c", last_epoch=1, end_offset=2, pre_vote=False))
    assert last_sent(cl, "b", "repl_vote_ok").body["granted"] and cl["b"].voted_for == "c"


def test_vote_refused_to_candidate_with_lower_last_epoch():
    cl = settled()
    cl.write("a", [b"r1"])
    cl.advance(0.3)
    cl.inject("c", "b", "repl_vote", vote_body(5, "c", last_epoch=0, end_offset=100, pre_vote=False))
    reply = last_sent(cl, "b", "repl_vote_ok")
    assert not reply.body["granted"] and reply.body["epoch"] == 5
    assert cl["b"].voted_for is None
    cl.inject("c", "b", "repl_vote", vote_body(5, "c", last_epoch=1, end_offset=1, pre_vote=False))
    assert last_sent(cl, "b", "repl_vote_ok").body["granted"]


def test_pre_vote_refused_while_voter_heard_from_leader_within_election_timeout():
    cl = settled()
    b = cl["b"]
    cl.inject("c", "b", "repl_vote", vote_body(2, "c", last_epoch=1, end_offset=0, pre_vote=True))
    reply = last_sent(cl, "b", "repl_vote_ok")
    assert reply.body["pre_vote"] and not reply.body["granted"]
    assert b.epoch == 1 and b.voted_for == "a"  # a pre-vote changes nothing
    # once b has not heard from the leader for an election timeout, the same pre-vote is granted
    cl.cut.add(("a", "b"))
    heard = b.last_leader_contact_s
    cl.advance(heard + ET + 0.001 - cl.now)
    cl.inject("c", "b", "repl_vote", vote_body(2, "c", last_epoch=1, end_offset=0, pre_vote=True))
    assert last_sent(cl, "b", "repl_vote_ok").body["granted"]
    assert b.epoch == 1


def test_returning_partitioned_follower_does_not_depose_healthy_leader():
    cl = settled()
    cl.isolate("c")
    cl.advance(6.0)  # c times out again and again, but its pre-votes find no majority
    assert cl["c"].epoch == 1 and cl["c"].role in (FOLLOWER, PRE_CANDIDATE)
    cl.heal()
    cl.advance(1.0)
    assert cl.leader() == "a" and cl["a"].epoch == 1
    assert cl["c"].role == FOLLOWER and cl["c"].leader == "a"


# ---------------------------------------------------------------------- 6. leases
def test_cut_off_leader_loses_lease_then_steps_down():
    cl = settled()
    a = cl["a"]
    cl.isolate("a")
    last = max(f.last_contact_s for f in a.followers.values())
    cl.advance(last + 0.75 * ET - 0.01 - cl.now)
    assert a.lease_valid(cl.now)
    cl.advance(0.02)
    assert a.is_leader and not a.lease_valid(cl.now)
    cl.advance(last + 2 * ET - 0.01 - cl.now)
    assert a.role == LEADER
    cl.advance(HB + 0.02)
    assert a.role == FOLLOWER and a.epoch == 1 and a.leader is None


def test_paused_leader_has_no_lease_on_waking():
    cl = settled()
    a = cl["a"]
    end = cl.write("a", [b"r"])
    cl.advance(0.3)
    assert a.lease_valid(cl.now)
    cl.paused.add("a")
    cl.advance(10.0)  # the others elect a new leader meanwhile
    assert a.role == LEADER and a.epoch == 1  # it ran nothing: it still thinks it leads...
    assert not a.lease_valid(cl.now)  # ...but takes no writes
    assert not a.handing_off(cl.now)
    new = cl.leader()
    assert new in ("b", "c") and cl[new].epoch >= 2
    assert a.reached("quorum", end, cl.now)  # committed before the pause: still true
    cl.paused.discard("a")
    cl.pump()  # what queued up for a: appends of the newer epoch
    assert a.role == FOLLOWER and a.epoch == cl[new].epoch


# ---------------------------------------------------------------------- 7. epoch-start rule (Raft Figure 8)
def test_new_leader_commits_older_epoch_records_only_with_its_marker():
    cl = settled()
    # a stores B0 and B1 (epoch 1): b gets both, c none, and no answer reaches a.
    cl.cut |= {("a", "c"), ("b", "a"), ("c", "a")}
    cl.write("a", [BIG])
    cl.write("a", [BIG])
    cl.pump()
    assert cl.nodes["b"].log.end_offset == 2 and cl["a"].high_watermark == 0
    cl.kill("a")
    cl.heal()
    # b's appends carrying B1 to c wait: c will hold B0 (epoch 1) but not b's epoch-2 marker at offset 2
    b1 = cl.hold(lambda m: m.src == "b" and m.dst == "c" and m.first_base_offset() == 1)
    cl.run_until(lambda: cl["b"].is_leader and cl["b"].followers["c"].match_end == 1, timeout_s=10)
    b, c = cl["b"], cl["c"]
    assert b.epoch == 2 and b.epoch_start == 2
    assert cl.nodes["c"].batches() == cl.nodes["b"].batches()[:1]  # B0 is on a majority (b and c)...
    assert b.high_watermark == 0  # ...but not committed: no majority holds epoch 2 yet
    assert c.high_watermark == 0
    assert not b.reached("quorum", 1, cl.now)
    cl.release(b1)
    cl.pump()
    assert b.followers["c"].match_end == 2 and c.history == [[1, 0], [2, 2]]
    assert b.high_watermark == 2


# ---------------------------------------------------------------------- 8. persistence
def test_restart_keeps_epoch_vote_history_and_leader_high_watermark():
    cl = settled()
    end = cl.write("a", [b"r1", b"r2"])
    cl.advance(HW_SAVE_INTERVAL_S + 0.5)
    before = {n: (cl[n].epoch, cl[n].voted_for, [list(e) for e in cl[n].history]) for n in cl.ids}
    assert before["b"] == (1, "a", [[1, 0]])
    assert cl["a"].high_watermark == end
    for node_id in cl.ids:
        cl.restart(node_id)
        replica = cl[node_id]
        assert (replica.epoch, replica.voted_for, replica.history) == before[node_id]
        # a restarting preferred replica asks for pre-votes at once (they change no epoch)
        assert replica.role == (PRE_CANDIDATE if node_id == "a" else FOLLOWER)
        assert replica.state.leader_epoch == 1
    assert cl["a"].high_watermark == end
    cl.advance(5.0)  # a restarted replica set elects a leader of epoch 2 and keeps the data
    assert cl[cl.leader()].epoch >= 2
    assert all(values(cl, n) == [b"r1", b"r2"] for n in cl.ids)


def test_follower_high_watermark_survives_restart():
    cl = settled()
    end = cl.write("a", [b"r1", b"r2"])
    cl.advance(3 * HW_SAVE_INTERVAL_S)
    assert cl["b"].high_watermark == end
    cl.restart("b")
    assert cl["b"].high_watermark == end


def test_no_second_vote_in_one_epoch_across_restart():
    cl = Cluster(start=False)
    cl.inject("a", "c", "repl_vote", vote_body(1, "a", last_epoch=0, end_offset=0, pre_vote=False))
    assert last_sent(cl, "c", "repl_vote_ok").body["granted"]
    assert cl.nodes["c"].saved == {"epoch": 1, "voted_for": "a", "history": [], "hw": 0, "cv": 0,
                                   "voters": ["a", "b", "c"], "learners": []}
    cl.restart("c")
    assert cl["c"].epoch == 1 and cl["c"].voted_for == "a"
    cl.inject("b", "c", "repl_vote", vote_body(1, "b", last_epoch=0, end_offset=0, pre_vote=False))
    assert not last_sent(cl, "c", "repl_vote_ok").body["granted"]
    cl.inject("a", "c", "repl_vote", vote_body(1, "a", last_epoch=0, end_offset=0, pre_vote=False))
    assert last_sent(cl, "c", "repl_vote_ok").body["granted"]  # the same vote may be repeated


def test_crash_loses_unsynced_tail_and_history_follows_the_log():
    cl = settled()
    cl.write("a", [b"r1"])
    cl.advance(0.3)
    for node_id in cl.ids:
        cl.nodes[node_id].sync()
    cl.kill("a")
    cl.run_until(lambda: bool(cl.leaders()), timeout_s=10)
    new = cl.leader()
    cl.advance(0.3)
    cl.write(new, [b"r2"])  # epoch 2, never synced anywhere
    cl.advance(0.3)
    other = "c" if new == "b" else "b"
    assert cl[other].history == [[1, 0], [2, 1]] and cl.nodes[other].log.end_offset == 2
    saved = cl.nodes[other].saved
    cl.restart(other, crash=True)
    replica = cl[other]
    assert cl.nodes[other].log.end_offset == 1
    assert replica.history == [[1, 0], [2, 1]] == saved["history"]  # a marker at the end is kept
    assert replica.high_watermark <= 1
    cl.advance(1.0)
    assert cl.nodes[other].batches() == cl.nodes[new].batches()


# ---------------------------------------------------------------------- 9. committed data is never truncated
def test_follower_refuses_to_truncate_below_its_high_watermark(caplog):
    # With fsync=always committed records are on a majority's disks: no power loss takes them,
    # so a leader that disagrees below the high watermark is a bug, refused.
    cl = settled(fsync_always=True)
    cl.write("a", [b"r1"])
    end = cl.write("a", [b"r2", b"r3"])
    cl.advance(0.5)
    c = cl["c"]
    assert c.high_watermark == end == 3
    before = cl.nodes["c"].batches()
    cl.paused.update({"a", "b"})
    # A "leader" of a higher epoch whose record before offset 1 is of another epoch: c says where to retry.
    cl.inject("b", "c", "repl_append", append_body(7, "b", prev_offset=0, prev_epoch=6, hw=0, epoch_start=3),
              (stamped(1, 6, 2),))
    reply = last_sent(cl, "c", "repl_append_ok")
    assert not reply.body["ok"] and reply.body["epoch"] == 7
    assert cl.nodes["c"].batches() == before
    # It retries from the start with a batch that conflicts with committed offset 0.
    with caplog.at_level(logging.ERROR, logger="meshq.replica"):
        cl.inject("b", "c", "repl_append", append_body(7, "b", prev_offset=-1, prev_epoch=0, hw=0, epoch_start=3),
                  (stamped(0, 6, 1) + stamped(1, 6, 2),))
    assert any("refusing to truncate" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert cl.nodes["c"].batches() == before
    assert cl.nodes["c"].truncations == []
    assert c.high_watermark == end
    assert not any(m.src == "c" and m.type == "repl_append_ok" and m.body["ok"] and m.body["epoch"] == 7
                   for m in cl.sent)


def test_follower_gives_up_records_a_power_loss_took_from_the_majority_without_fsync_always(caplog):
    # With fsync=interval/never a power loss of a majority can take back committed records: the
    # leader of a newer epoch elected without them holds the one history to go on with. A
    # follower that kept them truncates to the divergence point (its high watermark goes back,
    # loudly) instead of refusing for ever, and then holds exactly the leader's log.
    cl = settled()
    cl.write("a", [b"r1"])
    end = cl.write("a", [b"r2", b"r3"])
    cl.advance(0.5)
    c = cl["c"]
    assert c.high_watermark == end == 3
    cl.paused.update({"a", "b"})
    # A mismatch first: the hint is the run start, not the (lost) high watermark.
    cl.inject("b", "c", "repl_append", append_body(7, "b", prev_offset=1, prev_epoch=6, hw=0, epoch_start=2),
              (stamped(2, 6, 1),))
    reply = last_sent(cl, "c", "repl_append_ok")
    assert not reply.body["ok"] and reply.body["hint"] == 0
    with caplog.at_level(logging.ERROR, logger="meshq.replica"):
        cl.inject("b", "c", "repl_append", append_body(7, "b", prev_offset=0, prev_epoch=1, hw=2, epoch_start=2),
                  (stamped(1, 6, 1),))
    assert any("lost by a power loss" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert cl.nodes["c"].truncations == [1]
    assert cl.nodes["c"].log.end_offset == 2 and c.history == [[1, 0], [6, 1], [7, 2]]
    assert c.high_watermark == 2
    reply = last_sent(cl, "c", "repl_append_ok")
    assert reply.body["ok"] and reply.body["match_end"] == 2


# ---------------------------------------------------------------------- 10. duplication and reordering
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_duplicated_and_reordered_messages_are_harmless(seed):
    cl = settled(seed=seed)
    cl.duplicate = 0.4
    cl.reorder = True
    written: list[bytes] = []
    for i in range(25):
        leader = cl.leader()
        value = f"r{i}".encode()
        cl.write(leader, [value, value + b"'"])
        written += [value, value + b"'"]
        cl.advance(0.03 * (i % 4))
        cl.check_committed_agree()
    # a stale append, delivered long after the ones that followed it
    stale = cl.hold(lambda m: m.src == "a" and m.dst == "b" and m.type == "repl_append")
    cl.write("a", [b"late"])
    written.append(b"late")
    cl.release(stale)
    cl.advance(0.05)
    cl.write("a", [b"last"])
    written.append(b"last")
    cl.advance(1.0)
    assert cl.leader() == "a" and cl["a"].epoch == 1
    for node_id in cl.ids:
        assert cl.nodes[node_id].batches() == cl.nodes["a"].batches()
        assert cl[node_id].high_watermark == cl.nodes["a"].log.end_offset == len(written)
        assert cl.nodes[node_id].truncations == []
    assert values(cl, "c") == written


# ---------------------------------------------------------------------- 11. preferred leader
def test_leadership_hand_off_to_caught_up_preferred_replica():
    cl = Cluster(start=False)
    cl.kill("a")
    cl.start("b")
    cl.start("c")
    cl.run_until(lambda: bool(cl.leaders()), timeout_s=10)
    old = cl.leader()
    leader = cl[old]
    assert old in ("b", "c") and leader.epoch >= 1
    cl.advance(0.2)
    end = cl.write(old, [b"r1"])
    cl.revive("a")
    cl.start("a")
    back_s = cl.now
    handoff = cl.hold(lambda m: m.type == "repl_timeout_now")
    cl.run_until(lambda: bool(cl.held), timeout_s=20)
    sent = cl.held[0]
    assert sent.src == old and sent.dst == "a" and sent.body["epoch"] == leader.epoch
    assert sent.sent_s >= leader.leader_since_s + 2 * ET
    assert sent.sent_s < max(back_s, leader.leader_since_s + 2 * ET) + 3 * HB  # once it has caught up
    assert leader.followers["a"].match_end == cl.nodes[old].log.end_offset == end
    assert leader.handing_off(cl.now) and not leader.lease_valid(cl.now)
    assert leader.is_leader
    epoch = leader.epoch
    cl.release(handoff)
    cl.pump()
    assert cl["a"].role == LEADER and cl["a"].epoch == epoch + 1
    assert leader.role == FOLLOWER and not leader.handing_off(cl.now)
    cl.advance(0.5)
    assert cl.leader() == "a" and all(cl[n].leader == "a" for n in cl.ids)
    end = cl.write("a", [b"r2"])
    cl.advance(0.3)
    assert all(values(cl, n) == [b"r1", b"r2"] and cl[n].high_watermark == end for n in cl.ids)
    cl.advance(5.0)
    assert cl.leader() == "a" and cl["a"].epoch == epoch + 1  # and the preferred replica stays


def test_no_hand_off_before_two_election_timeouts_of_leadership():
    cl = Cluster(start=False)
    cl.kill("a")
    cl.start("b")
    cl.start("c")
    cl.run_until(lambda: bool(cl.leaders()), timeout_s=10)
    leader = cl[cl.leader()]
    cl.revive("a")
    cl.start("a")
    cl.advance(leader.leader_since_s + 2 * ET - 0.01 - cl.now)
    assert cl["a"].role == FOLLOWER
    assert not any(m.type == "repl_timeout_now" for m in cl.sent)
    assert leader.lease_valid(cl.now) and not leader.handing_off(cl.now)


def test_a_leader_handed_leadership_moves_it_to_the_preferred_replica_without_the_window():
    # Nothing was interrupted when leadership was handed over (a leader dropped from the replica
    # set, a rebalance): the move-back to the preferred replica does not wait for the window.
    cl = settled()
    cl.advance(3 * ET)
    cl["a"].set_config(["a", "b", "c"], [], 0, cl.now)  # (not newer: ignored)
    cl.inject("a", "b", "repl_timeout_now", {"topic": TOPIC, "partition": PARTITION, "epoch": cl["a"].epoch,
                                             "cv": 0})
    cl.pump()
    assert cl.leader() == "b" and cl["b"].led_by_hand_off
    taken_s = cl.now
    cl.run_until(lambda: cl.leaders() == ["a"], timeout_s=5)
    assert cl.now < taken_s + 2 * ET + 3 * HB + 1e-9
    assert not cl["a"].led_by_hand_off or cl["a"].leader_since_s >= taken_s


def write_steadily(cl: Cluster, seconds: float, every_s: float = 0.05) -> None:
    """Write one record at the leader every ``every_s`` (when there is one that takes writes)."""
    until = cl.now + seconds
    while cl.now < until:
        leaders = cl.leaders()
        if leaders:
            leader = cl.leader()
            if cl[leader].lease_valid(cl.now):
                cl.write(leader, [b"w"])
        cl.advance(every_s)


def test_a_slow_leader_hands_leadership_to_the_most_complete_follower_and_is_not_moved_back_while_slow():
    cl = settled()
    write_steadily(cl, SLOW_MIN_LEAD_ELECTIONS * ET)
    assert cl.leader() == "a"
    cl.slow["a"] = 0.06  # a's link: 120 ms round trips; b and c talk to each other at once
    slow_s = cl.now
    write_steadily(cl, 8 * ET)
    hand_off = last_sent(cl, "a", "repl_timeout_now")
    assert hand_off.dst in ("b", "c") and hand_off.sent_s > slow_s + handoff.SLOW_WINDOW_ELECTIONS * ET
    assert cl.leader() in ("b", "c")
    new = cl.leader()
    cl.check_committed_agree()
    write_steadily(cl, 2 * STABILITY_ELECTIONS * ET)  # still slow: the preferred replica stays a follower
    assert cl.leader() == new and cl["a"].role == FOLLOWER
    assert hand_off.body["slow"] and cl[new].led_by_slow_hand_off
    cl.slow.clear()
    fast_s = cl.now
    since = cl[new].leader_since_s
    # normal again: back once it has been steady for the window (counted from the hand-off at the
    # earliest, and restarted at every heartbeat that found it slow)
    write_steadily(cl, STABILITY_ELECTIONS * ET + 2 * ET)
    assert cl.leader() == "a"
    back = last_sent(cl, new, "repl_timeout_now")
    assert back.dst == "a" and not back.body.get("slow", False)
    assert back.sent_s >= max(fast_s, since) + STABILITY_ELECTIONS * ET - 2 * HB
    cl.check_committed_agree()


def test_without_the_slow_leader_rule_a_slow_leader_keeps_leading(monkeypatch):
    # The mutation: the test above fails without the rule.
    monkeypatch.setattr("meshq.core.replica.leader_slow", lambda *args, **kwargs: False)
    cl = settled()
    write_steadily(cl, SLOW_MIN_LEAD_ELECTIONS * ET)
    cl.slow["a"] = 0.06
    write_steadily(cl, 8 * ET)
    assert cl.leader() == "a" and not any(m.type == "repl_timeout_now" for m in cl.sent)


def test_a_leader_slow_only_to_one_follower_keeps_leading():
    # One slow follower does not slow a quorum commit (the other follower answers at once).
    cl = settled()
    write_steadily(cl, SLOW_MIN_LEAD_ELECTIONS * ET)
    cl.slow["c"] = 0.2
    write_steadily(cl, 10 * ET)
    assert cl.leader() == "a" and not any(m.type == "repl_timeout_now" for m in cl.sent)


def test_an_idle_slow_leader_keeps_leading_and_no_hand_off_without_a_caught_up_follower():
    cl = settled()
    cl.advance(SLOW_MIN_LEAD_ELECTIONS * ET)
    cl.slow["a"] = 0.06
    cl.advance(10 * ET)  # no commits: nothing to judge
    assert cl.leader() == "a" and not any(m.type == "repl_timeout_now" for m in cl.sent)
    assert cl["a"].followers.most_complete_voter(cl.now, ["a", "b", "c"], at_least=cl["a"].log.end_offset + 1,
                                                  fastest=True) is None


def test_a_leader_handed_leadership_is_held_down_before_handing_it_on_for_slowness(monkeypatch):
    # When the whole network is slow every leader sees it: one that was handed leadership keeps
    # it for the hold-down before handing it on. (The move-back is out of the picture here.)
    monkeypatch.setattr("meshq.core.replica.steady_enough", lambda since_s, now_s, election_timeout_s: False)
    cl = settled()
    write_steadily(cl, SLOW_MIN_LEAD_ELECTIONS * ET)
    cl.slow["a"] = 0.06
    write_steadily(cl, 8 * ET)
    new = cl.leader()
    assert new != "a" and cl[new].led_by_slow_hand_off
    since = cl[new].leader_since_s
    cl.slow = {new: 0.06}  # now the new leader's link is slow
    write_steadily(cl, since + SLOW_HOLD_DOWN_ELECTIONS * ET - cl.now - 0.5)
    assert cl.leader() == new and cl[new]._slow_watch.slow_since_s is not None  # slow, but held down
    assert not any(m.type == "repl_timeout_now" and m.src == new for m in cl.sent)
    write_steadily(cl, 2 * ET)
    assert cl.leader() != new and last_sent(cl, new, "repl_timeout_now").sent_s >= since + SLOW_HOLD_DOWN_ELECTIONS * ET


class FullSpace:
    """A node's storage space (``partitions.space``) that can be made full."""

    def __init__(self) -> None:
        self.full = False

    def refuse_writes(self, topic: str, partition: int) -> None:
        if self.full:
            raise StorageFullError("storage full (test)")

    def note_full(self, reason: str, now_s: float) -> None:
        self.full = True


def test_a_leader_whose_storage_is_full_hands_over_and_gets_leadership_back_once_steady():
    cl = settled()
    space = FullSpace()
    cl["a"]._space = space
    write_steadily(cl, 3 * ET)
    space.full = True  # a refuses new records from now on (its writes and its copies)
    full_s = cl.now
    cl.run_until(lambda: cl.leader() != "a", timeout_s=4 * ET)
    new = cl.leader()
    hand_off = last_sent(cl, "a", "repl_timeout_now")
    assert hand_off.dst == new and hand_off.sent_s < full_s + HB + 1e-9  # at the next heartbeat
    write_steadily(cl, 3 * STABILITY_ELECTIONS * ET)  # a refuses every copy: never moved back meanwhile
    assert cl.leader() == new
    space.full = False
    free_s = cl.now
    write_steadily(cl, STABILITY_ELECTIONS * ET + 2 * ET)
    # (back by preference once it holds the whole log again: only a slow predecessor waits a window)
    assert cl.leader() == "a" and last_sent(cl, new, "repl_timeout_now").sent_s >= free_s
    cl.check_committed_agree()


def test_a_leader_handed_leadership_by_preference_is_not_held_down():
    # Only a slow hand-off holds the successor down: the preferred replica that took its
    # leadership back hands it over for slowness after the ordinary minimum.
    cl = settled()
    write_steadily(cl, SLOW_MIN_LEAD_ELECTIONS * ET)
    cl.inject("a", "b", "repl_timeout_now", {"topic": TOPIC, "partition": PARTITION, "epoch": cl["a"].epoch, "cv": 0})
    cl.pump()
    assert cl.leader() == "b" and cl["b"].led_by_hand_off and not cl["b"].led_by_slow_hand_off
    write_steadily(cl, STABILITY_ELECTIONS * ET + 2 * ET)  # back to a by preference
    assert cl.leader() == "a" and cl["a"].led_by_hand_off and not cl["a"].led_by_slow_hand_off
    since = cl["a"].leader_since_s
    cl.slow["a"] = 0.06
    write_steadily(cl, 8 * ET)
    assert cl.leader() != "a"
    hand_off = last_sent(cl, "a", "repl_timeout_now")
    assert hand_off.body["slow"] and hand_off.sent_s < since + SLOW_HOLD_DOWN_ELECTIONS * ET


def test_restarted_preferred_replica_does_not_depose_a_healthy_leader():
    cl = Cluster(start=False)
    cl.kill("a")
    cl.start("b")
    cl.start("c")
    cl.run_until(lambda: bool(cl.leaders()), timeout_s=10)
    old = cl.leader()
    epoch = cl[old].epoch
    cl.revive("a")
    cl.start("a")  # campaigns at once: its pre-votes are refused
    cl.pump()
    assert cl.leader() == old and cl[old].epoch == epoch
    assert [m.body["pre_vote"] for m in cl.sent if m.src == "a" and m.type == "repl_vote"] == [True, True]
    assert cl["a"].epoch == epoch and cl["a"].role == FOLLOWER  # learned the epoch from the refusals
    cl.advance(HB + 0.01)
    assert cl["a"].role == FOLLOWER and cl["a"].leader == old and cl[old].epoch == epoch


# ---------------------------------------------------------------------- 12. fsync=always
def test_fsync_always_acknowledged_match_end_never_exceeds_synced_offset():
    cl = Cluster(fsync_always=True, seed=5)
    checked = []

    def check(msg: Msg) -> None:
        if msg.type == "repl_append_ok" and msg.body["ok"]:
            synced = cl.nodes[msg.src].log.synced_offset
            assert msg.body["match_end"] <= synced, f"{msg.src} acknowledged {msg.body['match_end']} > synced {synced}"
            checked.append(msg.body["match_end"])

    cl.send_hooks.append(check)
    cl.advance(0.5)
    b = cl.nodes["b"]
    b.auto_sync = False  # b's disk is slow
    end = cl.write("a", [b"r1", b"r2"])
    cl.pump()
    assert b.log.end_offset == end and b.log.synced_offset == 0
    assert cl["a"].followers["b"].match_end <= 0
    assert cl["a"].high_watermark == end  # from a and c, both synced
    cl.nodes["c"].auto_sync = False
    end2 = cl.write("a", [b"r3"])
    cl.advance(0.5)
    assert cl["a"].high_watermark == end  # a majority holds r3 but only a has it on disk
    assert not cl["a"].reached("quorum", end2, cl.now)
    b.sync()
    cl.pump()
    assert cl["a"].high_watermark == end2
    cl.nodes["c"].auto_sync = True
    b.auto_sync = True
    for i in range(10):
        cl.write("a", [f"x{i}".encode()])
        cl.advance(0.05)
    cl.advance(0.5)
    assert len(checked) > 10 and max(checked) == cl.nodes["a"].log.end_offset
    assert all(cl[n].high_watermark == cl.nodes["a"].log.end_offset for n in cl.ids)


def test_fsync_always_leader_counts_only_its_own_synced_records():
    cl = Cluster(fsync_always=True)
    cl.advance(0.5)
    a = cl.nodes["a"]
    a.auto_sync = False
    end = cl.write("a", [b"r"])
    cl.pump()
    assert cl["a"].followers["b"].match_end == end and cl["a"].followers["c"].match_end == end
    assert cl["a"].high_watermark == end  # b and c hold it on disk: a majority without a
    assert not cl["a"].reached("leader", end, cl.now)  # acks=leader means on the leader's disk
    a.sync()
    assert cl["a"].reached("leader", end, cl.now)


# ---------------------------------------------------------------------- bugs found
def test_history_tracks_older_epoch_batches_appended_after_an_empty_marker():
    cl = Cluster(["c"], replicas=["a", "b", "c", "d", "e"])
    c = cl["c"]
    # epoch 1 (leader a): offsets 0-9, committed
    cl.inject("a", "c", "repl_append", append_body(1, "a", -1, 0, 10, 0),
              (b"".join(stamped(i, 1) for i in range(10)),))
    # epoch 3 (leader b, log ending at 10): c adopts b's marker and nothing else reaches it
    cl.inject("b", "c", "repl_append", append_body(3, "b", 9, 1, 10, 10), ())
    assert c.history == [[1, 0], [3, 10]]
    # epoch 4 (leader d, elected by a, d, e whose logs lack b's marker): d's epoch-1 records 10-11,
    # first part of what d sends (d's log, and so its epoch start, goes on to 14)
    cl.inject("d", "c", "repl_append", append_body(4, "d", 9, 1, 10, 14), (stamped(10, 1) + stamped(11, 1),))
    stored = {h.base_offset: h.leader_epoch for h in cl.nodes["c"].headers()}
    assert stored[10] == 1 and stored[11] == 1
    # epoch 5 (leader b again, whose records 10-11 are of epoch 3): c must not match it at offset 11
    cl.inject("b", "c", "repl_append", append_body(5, "b", 11, 3, 10, 15),
              (stamped(12, 3) + stamped(13, 3) + stamped(14, 3),))
    reply = last_sent(cl, "c", "repl_append_ok")
    assert not (reply.body["ok"] and reply.body["match_end"] > 11), \
        f"c acknowledged {reply.body} after records of another epoch"
    assert c.epoch_at(10) == stored[10] and c.epoch_at(11) == stored[11]


def test_slow_sync_does_not_let_a_follower_confirm_an_unverified_tail():
    cl = settled(fsync_always=True)
    a, b, c = (cl.nodes[n] for n in "abc")
    a.auto_sync = False  # syncs of a and c are done by hand from here on (c's disk stalls)
    c.auto_sync = False
    cl.cut |= {("b", "a"), ("c", "a")}  # no answers reach a: its high watermark stays 0
    cl.write("a", [BIG])
    cl.write("a", [BIG])
    cl.pump()
    a.sync()
    cl.cut.add(("a", "b"))
    cl.write("a", [b"epoch-1-tail"])  # offset 2 reaches c only
    cl.pump()
    assert c.log.end_offset == 3 and c.log.synced_offset == 0 and c.replica.high_watermark == 0
    cl.kill("a")
    cl.restart("a", crash=True)  # a loses its unsynced offset 2
    cl.revive("a")
    a.auto_sync = True
    assert a.log.end_offset == 2
    cl.heal()
    cl.isolate("c")
    cl.hold(lambda m: m.type == "repl_append" and m.body["epoch"] >= 2 and m.dst != "c")
    cl.run_until(lambda: any(cl[n].is_leader and cl[n].epoch == 2 for n in "ab"), timeout_s=10)
    new = cl.leader()
    other = "a" if new == "b" else "b"
    end = cl.write(new, [b"acked"])  # offset 2 of epoch 2, on the new leader only
    cl.pump()
    cl.heal()
    cl.cut |= {(new, other), (other, new)}
    cl.hold(lambda m: m.src == new and m.dst == "c" and m.first_base_offset() == 1)
    cl.run_until(lambda: cl[new].followers["c"].match_end >= 0, timeout_s=5)
    c.sync()  # c's stalled sync completes
    cl.pump()
    acknowledged = cl[new].reached("quorum", end, cl.now)  # what a producer with acks=quorum is told
    holders = [n for n in cl.ids if cl.nodes[n].batches_below(end) == cl.nodes[new].batches_below(end)]
    # the new leader fails; the other two elect a leader among themselves
    cl.kill(new)
    cl.release()
    cl.heal()
    c.auto_sync = True
    cl.run_until(lambda: bool(cl.leaders()), timeout_s=10)
    cl.advance(1.0)
    survivor = cl.leader()
    assert not acknowledged or b"acked" in values(cl, survivor), (
        f"{new} acknowledged offset 2 with acks=quorum while only {holders} held it; {survivor} now leads "
        f"epoch {cl[survivor].epoch} with {values(cl, survivor)[2:]} at offset 2")


# ---------------------------------------------------------------------- compaction (issue #19 item 5)
def test_a_follower_copies_a_compacted_leader_and_serves_the_same_latest_record_per_key():
    cl = settled()
    cl.kill("c")
    leader = cl.nodes["a"]
    leader.log._segment_bytes = 400  # small segments, so that some are sealed (the twin's own setting)
    for i in range(150):
        key = f"k{i % 4}".encode() if i < 130 else f"tail{i % 2}".encode()  # latest k0..k3 end up sealed
        data = batch_format.encode_batch([(key, b"%d" % i, None, WALL_MS)])
        leader.state.append(data, batch_format.parse_header(data), WALL_MS)
        cl["a"].on_local_append(cl.now)
        cl.pump()
    cl.advance(0.5)
    result = leader.log.compact(cl["a"].high_watermark, WALL_MS, None)
    leader.state.compacted()
    assert result.records_removed > 0
    cl.revive("c")
    cl.run_until(lambda: cl.nodes["c"].log.end_offset == leader.log.end_offset)

    def served(node_id: str) -> dict:
        log = cl.nodes[node_id].log
        data = log.read(log.start_offset, 1 << 40)
        return {r.offset: (r.key, r.value) for r in batch_format.decode_records(data, TOPIC, PARTITION)}

    def latest(records: dict) -> dict:
        return {key: (offset, value) for offset, (key, value) in sorted(records.items())}

    offsets = sorted(served("a"))
    assert any(b - a > 1 for a, b in zip(offsets, offsets[1:]))  # the copy crossed compaction gaps
    assert served("c") == served("a")  # the compacted batches, gaps and all
    assert latest(served("b")) == latest(served("a"))  # b never compacted: the same latest records
    assert len(served("b")) > len(served("a"))
