"""A leader that is alive but far slower than its replicas hands leadership over (meshq.core.replica,
meshq.core.partitions.latency): the round-trip probes of replication, ``repl_step_aside``, and no hand-back
to a slow preferred replica. Harness links carry a one-way delay (``Cluster.link_delay``)."""

from __future__ import annotations

from meshq.core import batch as batch_format
from meshq.core.partitions.latency import MIN_SAMPLES, SAMPLES, SPACING_S, WINDOW_S, PeerLatency
from meshq.core.replica import LEADER
from tests.core.replica_harness import Cluster

SLOW_S = 0.1  # one way: a 200 ms round trip, against ~0 on the other links


def slow_links(cl: Cluster, node: str, delay_s: float = SLOW_S) -> None:
    for other in cl.ids:
        if other != node:
            cl.link_delay[(node, other)] = cl.link_delay[(other, node)] = delay_s


def knows_fast(cl: Cluster, node: str, peer: str, rtt_s: float = 0.001, samples: int = MIN_SAMPLES) -> None:
    """``node`` measured ``peer``'s round trip elsewhere (another partition they share: the table is the node's)."""
    for i in range(samples):  # (spaced: PeerLatency keeps one sample per SPACING_S)
        cl.nodes[node].latency.note(peer, rtt_s, cl.now - (samples - 1 - i) * SPACING_S * 1.01)


def values(cl: Cluster, node: str) -> list[bytes]:
    return [r.value for b in cl.nodes[node].batches() for r in batch_format.decode_records(b, "t", 0)]


def started() -> Cluster:
    cl = Cluster(latency=PeerLatency)
    cl.run_until(lambda: cl.leaders() == ["a"], timeout_s=5)
    cl.write("a", [b"r1"])
    cl.advance(3.0)  # past two election timeouts of leadership: hand-offs allowed
    return cl


def test_probes_measure_the_round_trip_on_both_sides():
    cl = started()
    slow_links(cl, "c", 0.03)
    since = cl.now
    cl.advance(3.0)
    for node, peer in (("a", "c"), ("c", "a")):  # leader -> follower, and follower -> leader (echo + held)
        rtt = cl.nodes[node].latency.rtt(peer, cl.now)
        assert rtt is not None and abs(rtt - 0.06) < 0.005, (node, peer, rtt)
    assert cl.nodes["a"].latency.rtt("b", cl.now) < 0.005
    probes = [m for m in cl.sent if m.type == "repl_append" and m.src == "a" and m.dst == "b" and "ts" in m.body
              and m.sent_s > since]
    assert len(probes) <= 3.0 / 0.15 + 2  # at most one probe per heartbeat interval per follower


def test_a_slow_leader_hands_over_to_a_follower_and_gets_it_back_once_fast():
    cl = started()
    knows_fast(cl, "b", "c")
    knows_fast(cl, "c", "b")
    slow_links(cl, "a")
    cl.run_until(lambda: cl.leaders() and cl.leader() != "a", timeout_s=5)
    new = cl.leader()
    asked = [m for m in cl.sent if m.type == "repl_step_aside"]
    handed = [m for m in cl.sent if m.type == "repl_timeout_now"]
    assert asked and all(m.dst == "a" for m in asked)
    assert handed[0].src == "a" and handed[0].dst == new and handed[0].dst in {m.src for m in asked}
    end = cl.write(new, [b"r2"])
    cl.advance(2 * WINDOW_S)  # a caught up long ago, yet stays a follower while its link is slow
    assert cl.leader() == new and cl["a"].role != LEADER
    assert len([m for m in cl.sent if m.type == "repl_timeout_now"]) == 1
    assert all(values(cl, n) == [b"r1", b"r2"] for n in cl.ids) and cl[new].high_watermark == end
    cl.link_delay.clear()  # the link is fast again: the preferred replica takes its partition back
    cl.run_until(lambda: cl.leader() == "a", timeout_s=WINDOW_S + 10)
    cl.write("a", [b"r3"])
    cl.advance(0.5)
    assert all(values(cl, n) == [b"r1", b"r2", b"r3"] for n in cl.ids)


def test_a_follower_with_a_slow_link_of_its_own_asks_nothing():
    cl = started()
    slow_links(cl, "c")
    knows_fast(cl, "c", "b", 0.2)  # from c every peer is slow alike
    knows_fast(cl, "b", "c", 0.2)
    cl.advance(5.0)
    assert cl.leader() == "a" and not [m for m in cl.sent if m.type == "repl_step_aside"]


def test_a_leader_steps_aside_only_when_its_own_round_trips_agree_and_once_the_follower_holds_the_log():
    cl = started()
    body = {"topic": "t", "partition": 0, "epoch": cl["a"].epoch, "cv": cl["a"].config_version}
    handed = lambda: [m for m in cl.sent if m.type == "repl_timeout_now"]  # noqa: E731
    cl.inject("b", "a", "repl_step_aside", body)  # a's own measure of the link to b: fast
    cl.pump()
    assert cl.leader() == "a" and not handed() and cl["a"].lease_valid(cl.now)
    slow_links(cl, "a")  # a's links to both: it is the slow one (b knows no other peer: it asks nothing)
    cl.advance(2.0)
    assert cl.nodes["a"].latency.link_slow("b", cl.now) and not [m for m in cl.sent if m.type == "repl_step_aside"]
    cl.inject("b", "a", "repl_step_aside", {**body, "epoch": body["epoch"] - 1})  # a stale request
    cl.pump()
    assert not handed() and cl["a"].lease_valid(cl.now)
    held = cl.hold(lambda m: m.type == "repl_append" and m.dst == "b" and bool(m.payloads))
    end = cl.write("a", [b"r2"])  # b lacks a record (still in sync: it is that recent)
    cl.inject("b", "a", "repl_step_aside", body)
    cl.pump()
    # the hand-off is under way: writes paused, but no campaign asked for before b holds the whole log
    assert cl["a"].handing_off(cl.now) and not cl["a"].lease_valid(cl.now) and not handed()
    cl.release(held)
    cl.run_until(lambda: bool(handed()), timeout_s=0.9)
    assert [m.dst for m in handed()] == ["b"]
    cl.run_until(lambda: cl.leaders() == ["b"], timeout_s=2)
    assert cl["b"].log.end_offset == end


def test_a_leader_whose_own_round_trips_look_fast_steps_aside_when_a_majority_of_its_followers_ask():
    """A leader starved of CPU runs in bursts: what it sends in one is answered within it, so only its
    followers see it slow. One follower's request is not enough; both (a majority of the two) are."""
    cl = started()
    body = {"topic": "t", "partition": 0, "epoch": cl["a"].epoch, "cv": cl["a"].config_version}
    handed = lambda: [m for m in cl.sent if m.type == "repl_timeout_now"]  # noqa: E731
    cl.inject("b", "a", "repl_step_aside", body)
    cl.pump()
    assert not handed() and cl["a"].lease_valid(cl.now) and not cl.nodes["a"].latency.link_slow("c", cl.now)
    cl.advance(1.0)
    cl.inject("c", "a", "repl_step_aside", body)
    cl.pump()
    assert [m.dst for m in handed()] == ["c"]
    cl.run_until(lambda: cl.leaders() == ["c"], timeout_s=2)


def test_requests_older_than_four_election_timeouts_do_not_add_up():
    cl = started()
    body = {"topic": "t", "partition": 0, "epoch": cl["a"].epoch, "cv": cl["a"].config_version}
    cl.inject("b", "a", "repl_step_aside", body)
    cl.advance(4.5)
    cl.inject("c", "a", "repl_step_aside", body)
    cl.pump()
    assert cl.leader() == "a" and not [m for m in cl.sent if m.type == "repl_timeout_now"]


def test_a_leader_whose_own_timers_run_late_steps_aside_at_one_followers_request():
    cl = started()
    body = {"topic": "t", "partition": 0, "epoch": cl["a"].epoch, "cv": cl["a"].config_version}
    table = cl.nodes["a"].latency
    # a's heartbeat timers ran 80 ms late, as on a starved CPU (the harness runs them on time: the samples are
    # dated just after its last one, so they count)
    for i in range(SAMPLES):
        table.note_lag(0.08, cl.now + (i + 1) * SPACING_S * 1.01)
    assert table.starved(cl.now) and not table.link_slow("b", cl.now)
    cl.inject("b", "a", "repl_step_aside", body)
    cl.pump()
    assert [m.dst for m in cl.sent if m.type == "repl_timeout_now"] == ["b"]


def test_a_leader_never_hands_over_to_an_asker_it_finds_slow_unless_its_own_timers_run_late():
    """A starved follower hears its leader only between its pauses and finds it slow; the leader's round trips to
    that follower are slow too (the follower answers late), but those to its other follower are fast: the asker is
    the slow one, and the leader keeps its fast quorum. Only a leader whose own timers run late discounts that."""
    cl = started()
    body = {"topic": "t", "partition": 0, "epoch": cl["a"].epoch, "cv": cl["a"].config_version}
    cl.link_delay[("a", "b")] = cl.link_delay[("b", "a")] = SLOW_S  # from a: b slow, c fast
    cl.advance(2.0)
    table = cl.nodes["a"].latency
    assert table.slow("b", cl.now) and table.link_slow("b", cl.now)
    cl.inject("b", "a", "repl_step_aside", body)
    cl.pump()
    assert cl.leader() == "a" and not [m for m in cl.sent if m.type == "repl_timeout_now"]
    cl.inject("c", "a", "repl_step_aside", body)  # b's refused request does not count: c alone is no majority
    cl.pump()
    assert cl.leader() == "a" and not [m for m in cl.sent if m.type == "repl_timeout_now"]
    for i in range(SAMPLES):  # now a's own heartbeat timers run 80 ms late (see the test above)
        table.note_lag(0.08, cl.now + (i + 1) * SPACING_S * 1.01)
    cl.inject("b", "a", "repl_step_aside", body)
    cl.pump()
    cl.run_until(lambda: bool([m for m in cl.sent if m.type == "repl_timeout_now"]), timeout_s=1.0)
    assert [m.dst for m in cl.sent if m.type == "repl_timeout_now"] == ["b"]


def test_followers_ask_a_leader_whose_timers_run_late_though_its_round_trips_look_fast():
    """The leader reports the lag of its timers in its probes; a follower whose own timers (or its other peers')
    run on time finds it slow by that alone, asks, and the starved leader hands over."""
    cl = started()
    for node in ("b", "c"):  # b and c lead other partitions, on time (their own lag: 1 ms)
        for i in range(SAMPLES):
            cl.nodes[node].latency.note_lag(0.001, cl.now - (SAMPLES - i) * SPACING_S * 1.01)
    for i in range(SAMPLES):  # a's heartbeat timers run 80 ms late from now on
        cl.nodes["a"].latency.note_lag(0.08, cl.now + (i + 1) * SPACING_S * 1.01)
    cl.run_until(lambda: cl.leaders() and cl.leader() != "a", timeout_s=5)
    for node in ("b", "c"):
        table = cl.nodes[node].latency
        assert table.peer_lag("a", cl.now) == 0.08 and table.rtt("a", cl.now) < 0.005, node
    assert [m.src for m in cl.sent if m.type == "repl_step_aside"], "no follower asked"
    assert cl.nodes[cl.leader()].latency.status(cl.now)["a"]["lag_ms"] == 80.0


class _Starved(PeerLatency):
    """A table whose node's heartbeat timers all run 80 ms late (a CPU it gets only in bursts)."""

    def note_lag(self, lag_s: float, now_s: float) -> None:
        super().note_lag(0.08, now_s)


def test_followers_that_know_a_starved_nodes_lag_already_ask_once_it_can_agree_when_it_wins_a_new_epoch():
    """The lag is the node's, known from the other partitions it leads: on a new epoch (a partition just created,
    an election) a request sent on the very first append would find no follower in sync yet and be dropped, and the
    next would wait 4 election timeouts. Followers ask on an append that echoes one of their answers instead."""
    cl = Cluster(latency=PeerLatency, start=False)
    cl.nodes["a"].latency = _Starved()
    cl.nodes["a"].build()
    for i in range(SAMPLES):  # evidence from other partitions, just before this one starts
        when = cl.now - (SAMPLES - i) * SPACING_S * 1.01
        cl.nodes["a"].latency.note_lag(0.08, when)
        for node in ("b", "c"):
            cl.nodes[node].latency.note_lag(0.001, when)  # b and c lead other partitions, on time
            cl.nodes[node].latency.note_peer_lag("a", 0.08, when)  # ... and follow a's, which reported its lag
    for node in cl.ids:
        cl.start(node)
    cl.pump()
    cl.run_until(lambda: cl.leaders() == ["a"], timeout_s=5)
    won = cl.now
    cl.run_until(lambda: any(m.type == "repl_timeout_now" for m in cl.sent), timeout_s=20)
    handed = [m.sent_s - won for m in cl.sent if m.type == "repl_timeout_now"]
    assert handed[0] < 1.0, f"handed over {handed[0]:.2f} s after winning (a first request wasted: ~4 s)"
