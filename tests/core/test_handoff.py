"""The hand-off rules (meshq.core.handoff): commit latencies, the slow-leader test, slow peers and the windows."""

from __future__ import annotations

from meshq.core import handoff
from meshq.core.followers import FollowerProgress
from meshq.core.handoff import (
    SLOW_FACTOR,
    SLOW_FLOOR_S,
    SLOW_HOLD_DOWN_ELECTIONS,
    SLOW_MIN_COMMITS,
    SLOW_MIN_LEAD_ELECTIONS,
    SLOW_WINDOW_ELECTIONS,
    STABILITY_ELECTIONS,
    CommitClock,
    SlowWatch,
    leader_slow,
    peer_slow,
    steady_enough,
)


def test_commit_clock_times_each_append_until_the_high_watermark_covers_it():
    clock = CommitClock()
    clock.appended(5, 10.0)
    clock.appended(9, 10.1)
    clock.appended(9, 10.2)  # nothing new: not timed twice
    clock.committed(5, 10.3)
    clock.committed(8, 10.4)  # covers no whole append
    clock.committed(9, 10.6)
    assert [round(latency, 3) for _at, latency in clock.samples] == [0.3, 0.5]
    assert clock.recent(10.6, 0.1) == [clock.samples[1][1]]
    clock.clear()
    assert not clock.samples and clock.recent(11.0, 5.0) == []


def test_a_leader_is_slow_only_with_enough_commits_above_the_floor_and_the_followers_hold_time():
    slow = [0.2] * SLOW_MIN_COMMITS
    assert leader_slow(slow, [0.0, 0.0])
    assert leader_slow(slow[:-1], [0.0]) is None  # too few commits to judge
    assert not leader_slow([SLOW_FLOOR_S * 0.9] * 10, [0.0])  # under the floor
    assert not leader_slow(slow, [0.2 / SLOW_FACTOR + 0.001])  # the followers' own fsync explains it
    assert leader_slow(slow, [0.2 / SLOW_FACTOR + 0.001, 0.0])  # the fastest follower is the one a quorum waits for
    assert not leader_slow([0.2, 0.2, 0.001, 0.001, 0.001], [0.0])  # the median, not the worst
    assert not leader_slow([1.6] * 10, [0.0], ceiling_s=1.0)  # a stall (paused, cut-off followers), not a slow link


def test_a_peer_is_slow_next_to_the_others_never_when_unknown():
    assert not peer_slow(None, [0.001])
    assert peer_slow(0.2, [0.001])
    assert not peer_slow(0.2, [0.1])  # everyone is slow: the link is not this peer's
    assert not peer_slow(SLOW_FLOOR_S * 0.9, [0.0001])  # under the floor
    assert peer_slow(SLOW_FLOOR_S * 1.1, [])  # alone: only the floor


def test_slow_watch_needs_the_whole_window_and_a_leadership_old_enough():
    et = 1.0
    watch = SlowWatch()
    watch.check(100.0, True)
    watch.check(101.0, True)
    end = 100.0 + SLOW_WINDOW_ELECTIONS * et
    assert not watch.due(end - 0.01, leader_since_s=0.0, slow_hand_off=False, election_timeout_s=et)
    assert watch.due(end, leader_since_s=0.0, slow_hand_off=False, election_timeout_s=et)
    led = end - SLOW_MIN_LEAD_ELECTIONS * et
    assert watch.due(end, leader_since_s=led, slow_hand_off=False, election_timeout_s=et)
    assert not watch.due(end, leader_since_s=led + 0.01, slow_hand_off=False, election_timeout_s=et)
    held = end - SLOW_HOLD_DOWN_ELECTIONS * et
    assert not watch.due(end, leader_since_s=held + 0.01, slow_hand_off=True, election_timeout_s=et)
    assert watch.due(end, leader_since_s=held, slow_hand_off=True, election_timeout_s=et)
    watch.check(end - 0.5, None)  # too few commits: nothing changes
    assert watch.due(end, leader_since_s=0.0, slow_hand_off=False, election_timeout_s=et)
    watch.check(end, False)  # one heartbeat not slow: the window starts again
    watch.check(end + 0.1, True)
    assert not watch.due(end + 0.2, leader_since_s=0.0, slow_hand_off=False, election_timeout_s=et)


def test_the_move_back_waits_for_the_stability_window():
    assert steady_enough(float("-inf"), 5.0, 1.0)
    assert not steady_enough(10.0, 10.0 + STABILITY_ELECTIONS - 0.01, 1.0)
    assert steady_enough(10.0, 10.0 + STABILITY_ELECTIONS, 1.0)


def test_follower_progress_times_answers_by_the_newest_send_they_cover():
    f = FollowerProgress(0)
    f.sending(10, 1.0)
    f.sending(20, 1.1)
    f.sending(30, 1.2)
    f.timed(20, 0.004, 1.3)  # covers the sends up to 20: the newest of them went at 1.1
    assert round(f.ack_s, 3) == 0.2 and round(f.hold_s, 3) == 0.004
    f.timed(30, 0.0, 1.4)
    assert round(f.ack_s, 3) == round(0.2 + handoff.EWMA_WEIGHT * (0.2 - 0.2), 3)
    f.sending(40, 2.0)
    f.next_offset = 40
    assert f.refused(35) and not f.sent  # a refusal resets the position and forgets what was in flight
