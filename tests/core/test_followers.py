"""The leader's in-sync yardstick (``Followers._lagged_end``) resumes its scan between calls: it must
answer exactly what a full scan of the heartbeat samples answers, whatever the order of samples,
queries, epoch starts and clock steps."""

from __future__ import annotations

import random

from meshq.core.followers import Followers


def full_scan(followers: Followers, now_s: float, epoch_start: int, end: int) -> int:
    """The rule as the module docstring states it, walking every sample (the code before the resumed scan)."""
    cutoff = now_s - followers.replica_lag_s
    yardstick = epoch_start
    for sample_s, sample_end in followers._end_samples:
        if sample_s > cutoff:
            break
        yardstick = max(yardstick, sample_end)
    return min(yardstick, end)


def test_resumed_scan_answers_as_a_full_scan() -> None:
    rng = random.Random(18)
    for _ in range(200):
        followers = Followers("a", replica_lag_s=rng.choice([0.05, 0.3, 1.0]))
        now = 0.0
        end = 0
        followers.start_epoch(["a", "b", "c"], 0, now)
        for _ in range(600):
            step = rng.random()
            if step < 0.25:
                now += rng.choice([0.0, 0.01, 0.1, 0.5])
                end += rng.randrange(0, 5)
                followers.sample_end(now, end)  # (more than END_SAMPLES of them: the deque drops its oldest)
            elif step < 0.4:
                end = rng.randrange(0, end + 1)  # a log cut back (truncation): the samples need not grow
                followers.sample_end(now, end)
            elif step < 0.42:
                followers.start_epoch(["a", "b", "c"], end, now)
            else:
                ask = now + rng.choice([0.0, 0.0, 0.02, 0.2, 1.5, -0.2])  # the clock asked may also step back
                epoch_start = rng.randrange(0, end + 2)
                expected = full_scan(followers, ask, epoch_start, end)
                assert followers._lagged_end(ask, epoch_start, end) == expected


def test_one_follower_in_sync_as_in_the_list() -> None:
    followers = Followers("a", replica_lag_s=1.0)
    followers.start_epoch(["a", "b", "c", "d"], 0, 0.0)
    followers.sample_end(0.5, 10)
    followers.sample_end(2.0, 20)
    followers["b"].matched(10, 20)
    followers["c"].matched(20, 20)
    followers["d"].matched(20, 20)
    followers["c"].last_contact_s = 2.5
    followers["b"].last_contact_s = 2.5
    voters = ["a", "b", "c"]  # d: a learner
    listed = followers.in_sync(2.6, voters, 0, 20)
    for peer in ("b", "c", "d", "e"):
        assert followers.is_in_sync(peer, 2.6, voters, 0, 20) == (peer in listed)
    assert listed == ["a", "b", "c"]
