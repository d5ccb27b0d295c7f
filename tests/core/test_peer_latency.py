"""PeerLatency (meshq.core.partitions.latency): round-trip estimates and the rule that calls a peer slow."""

from __future__ import annotations

from meshq.core.partitions.latency import (
    MIN_SAMPLES,
    SAMPLES,
    SLOW_FACTOR,
    SLOW_FLOOR_S,
    SPACING_S,
    WINDOW_S,
    PeerLatency,
)

STEP_S = SPACING_S * 1.01  # samples this far apart are all kept


def filled(now_s: float = 100.0, **rtts: float) -> PeerLatency:
    table = PeerLatency()
    for peer, rtt in rtts.items():
        for i in range(MIN_SAMPLES):
            table.note(peer, rtt, now_s - (MIN_SAMPLES - 1 - i) * STEP_S)
    return table


def test_an_estimate_needs_enough_recent_samples_and_is_their_median():
    table = PeerLatency()
    for i, rtt in enumerate((0.001, 0.5)):
        table.note("b", rtt, 100.0 + i * STEP_S)
    assert table.rtt("b", 101.0) is None  # two samples: no estimate yet
    table.note("b", 0.002, 100.0 + 2 * STEP_S)
    assert table.rtt("b", 101.0) == 0.002  # one late answer does not move the median
    assert table.rtt("b", 100.0 + WINDOW_S + 0.3) is None  # all too old: a silent peer has no estimate
    assert table.rtt("nobody", 101.0) is None
    table.note("b", -0.5, 101.0)  # a clock jump's negative round trip is dropped
    assert table.rtt("b", 101.0) == 0.002


def test_a_burst_of_late_answers_counts_once():
    """A pause's backlog: every partition's probe answered at the same moment, all as old as the pause."""
    table = filled(b=0.001, c=0.001)
    for _ in range(3 * SAMPLES):
        table.note("b", 1.6, 100.05)
    assert table.rtt("b", 100.1) == 0.001 and not table.slow("b", 100.1)
    for i in range(SAMPLES):  # slowness that lasts is seen
        table.note("b", 0.3, 100.2 + i * STEP_S)
    assert table.slow("b", 100.2 + SAMPLES * STEP_S)


def test_a_peer_is_slow_only_far_above_both_the_floor_and_the_other_peers():
    assert filled(b=0.2, c=0.001).slow("b", 100.0)
    assert not filled(b=0.2, c=0.001).slow("c", 100.0)
    # above the floor but not SLOW_FACTOR times the others: a node whose own link is slow sees all alike
    assert not filled(b=0.2, c=0.2 / SLOW_FACTOR * 1.5).slow("b", 100.0)
    # far above the others but under the floor: a fast LAN with a busier peer is not a slow peer
    assert not filled(b=SLOW_FLOOR_S * 0.9, c=0.0001).slow("b", 100.0)
    # no other peer to compare with: nothing is slow
    assert not filled(b=0.5).slow("b", 100.0)
    # the others' estimates expired: no comparison, no verdict
    table = filled(now_s=100.0, c=0.001)
    for i in range(MIN_SAMPLES):
        table.note("b", 0.3, 100.0 + WINDOW_S + i * STEP_S)
    assert not table.slow("b", 100.0 + WINDOW_S + 0.5)


def test_link_slow_is_the_floor_alone_and_status_shows_both():
    table = filled(b=0.2, c=0.15)
    assert table.link_slow("b", 100.0) and not table.slow("b", 100.0)
    assert not filled(b=0.01).link_slow("b", 100.0)
    assert filled(b=0.2, c=0.001).status(100.0) == {"b": {"rtt_ms": 200.0, "slow": True},
                                                     "c": {"rtt_ms": 1.0, "slow": False}}


def test_starved_is_the_median_lag_of_a_leaders_own_timers():
    table = PeerLatency()
    for i in range(MIN_SAMPLES):
        table.note_lag(0.08, 100.0 + i * STEP_S)
    assert table.starved(100.5)
    assert not table.starved(100.0 + WINDOW_S + 1.0)  # old lags say nothing
    calm = PeerLatency()
    for i in range(SAMPLES):
        calm.note_lag(0.001 if i % 3 else 0.2, 100.0 + i * STEP_S)  # a late timer now and then is no starvation
    assert not calm.starved(101.0)
    for _ in range(SAMPLES):
        calm.note_lag(0.5, 101.05)  # a burst counts once
    assert not calm.starved(101.1)


def lags(table: PeerLatency, now_s: float = 100.0, own: float | None = None, **peers: float) -> PeerLatency:
    """``table`` with ``MIN_SAMPLES`` recent lags: its own timers' (``own``) and those ``peers`` reported."""
    for i in range(MIN_SAMPLES):
        when = now_s - (MIN_SAMPLES - 1 - i) * STEP_S
        if own is not None:
            table.note_lag(own, when)
        for peer, lag in peers.items():
            table.note_peer_lag(peer, lag, when)
    return table


def test_a_peer_whose_timers_run_far_later_than_the_others_is_slow_though_its_round_trips_are_fast():
    table = lags(filled(b=0.001, c=0.001), own=0.001, b=0.1, c=0.001)
    assert table.peer_lag("b", 100.0) == 0.1 and table.lag(100.0) == 0.001
    assert table.lags_behind("b", 100.0) and table.slow("b", 100.0)
    assert not table.slow("c", 100.0)
    assert table.status(100.0)["b"] == {"rtt_ms": 1.0, "slow": True, "lag_ms": 100.0}


def test_lag_compares_with_this_nodes_own_timers_when_no_other_peer_reports_one():
    assert lags(PeerLatency(), own=0.002, b=0.1).lags_behind("b", 100.0)
    assert not lags(PeerLatency(), b=0.1).lags_behind("b", 100.0)  # nothing to compare with: not singled out


def test_a_machine_loaded_as_a_whole_singles_out_nobody_by_lag():
    table = lags(PeerLatency(), own=0.06, b=0.1, c=0.05)  # every node's timers late alike
    assert not table.lags_behind("b", 100.0)
    # under the floor, however far above the others
    assert not lags(PeerLatency(), own=0.0001, b=SLOW_FLOOR_S * 0.9).lags_behind("b", 100.0)
    assert lags(PeerLatency(), own=SLOW_FLOOR_S / SLOW_FACTOR, b=SLOW_FLOOR_S).lags_behind("b", 100.0)


def test_reported_lags_fade_like_round_trips():
    table = lags(PeerLatency(), own=0.001, b=0.1)
    assert table.peer_lag("b", 100.0 + WINDOW_S + 1.0) is None
    assert not table.lags_behind("b", 100.0 + WINDOW_S + 1.0)


def test_a_node_whose_own_timers_run_late_accuses_nobody_by_lag():
    assert not lags(PeerLatency(), own=SLOW_FLOOR_S, b=0.5, c=0.001).lags_behind("b", 100.0)
    assert lags(PeerLatency(), own=SLOW_FLOOR_S * 0.9, b=0.5, c=0.001).lags_behind("b", 100.0)
