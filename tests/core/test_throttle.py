"""The catch-up copy budget (meshq.core.throttle.CopyThrottle): a token bucket on data time."""

from __future__ import annotations

import pytest

from meshq.core.throttle import CopyThrottle
from meshq.errors import ConfigError


def test_a_full_bucket_grants_its_burst_then_waits_for_the_rate():
    bucket = CopyThrottle(1000.0, 500)
    assert bucket.grant(0.0, 2000) == 500
    bucket.charge(0.0, 500)
    assert bucket.grant(0.0, 100) == 0 and bucket.waits == 1
    assert bucket.grant(0.1, 2000) == 100  # 0.1 s at 1000 B/s
    assert bucket.grant(10.0, 2000) == 500  # never more than the burst


def test_a_send_larger_than_its_grant_is_paid_back_before_the_next():
    bucket = CopyThrottle(1000.0, 500)
    assert bucket.grant(0.0, 100) == 100
    bucket.charge(0.0, 800)  # whole batches: more than granted
    assert bucket.tokens(0.0) == pytest.approx(-300)
    assert bucket.grant(0.2, 1000) == 0  # still in debt (−100)
    assert bucket.grant(0.5, 1000) == 200


def test_over_any_window_no_more_than_burst_plus_rate_times_window_plus_one_send_leaves():
    bucket = CopyThrottle(10_000.0, 2_000)
    sent = 0
    now = 0.0
    while now < 10.0:
        granted = bucket.grant(now, 3_000)
        if granted:
            bucket.charge(now, granted + 700)  # every send overshoots its grant by a batch
            sent += granted + 700
        now += 0.01
    assert sent <= 2_000 + 10_000 * 10.0 + 3_700
    assert sent >= 10_000 * 10.0 * 0.9  # and the rate is used, not wasted


def test_zero_is_unlimited():
    bucket = CopyThrottle(0, 1)
    assert bucket.unlimited and bucket.grant(0.0, 1 << 30) == 1 << 30
    bucket.charge(0.0, 1 << 30)
    assert bucket.grant(0.0, 1 << 30) == 1 << 30 and bucket.bytes_sent == 1 << 30


@pytest.mark.parametrize(("rate", "burst"), [(-1, 10), (True, 10), ("5", 10), (10, 0), (10, 1.5)])
def test_bad_settings_are_refused(rate, burst):
    with pytest.raises(ConfigError):
        CopyThrottle(rate, burst)


def test_copies_yield_to_live_writes_and_take_the_whole_rate_again_once_writes_stop():
    from meshq.core.throttle import LIVE_SHARE, LIVE_WINDOW_S

    bucket = CopyThrottle(6000.0, 6000)
    bucket.charge(0.0, 6000)  # empty
    assert not bucket.yielding(0.0) and bucket.rate_now(0.0) == 6000.0
    bucket.live(0.0, 100)  # a batch appended as a leader
    assert bucket.yielding(0.5) and bucket.rate_now(0.5) == pytest.approx(6000.0 * LIVE_SHARE)
    granted = bucket.grant(0.5, 10_000)
    assert granted == pytest.approx(0.5 * 6000 * LIVE_SHARE, abs=1)
    bucket.charge(0.5, granted)
    quiet = LIVE_WINDOW_S + 0.5  # no write for longer than the window: the whole rate
    assert not bucket.yielding(quiet) and bucket.rate_now(quiet) == 6000.0
    # the time from 0.5 s to the window's end at the share, the rest at the whole rate
    assert bucket.tokens(quiet) == pytest.approx((LIVE_WINDOW_S - 0.5) * 6000 * LIVE_SHARE + 0.5 * 6000, abs=1)


def test_a_steady_stream_of_writes_holds_the_copy_to_its_share_plus_the_write_rate():
    from meshq.core.throttle import LIVE_SHARE

    bucket = CopyThrottle(10_000.0, 2_000)
    sent, now = 0, 0.0
    while now < 20.0:
        bucket.live(now, 1)  # a write of 1 byte every 10 ms (100 B/s)
        granted = bucket.grant(now, 3_000, "r1")
        if granted:
            bucket.charge(now, granted)
            sent += granted
        now += 0.01
    assert 0.9 * 10_000 * LIVE_SHARE * 20 <= sent <= 2_000 + (10_000 * LIVE_SHARE + 100) * 20 + 3_000
    assert bucket.write_rate(now) == pytest.approx(100, rel=0.05)


def gains(rate: float, write_rate: float, replicas: int, seconds: float = 12.0) -> tuple[float, CopyThrottle]:
    """Bytes granted per second from 4 s on (the write rate estimate settled), ``replicas`` asking in turn."""
    bucket = CopyThrottle(rate, 1_000)
    now, sent, step = 0.0, 0, 0
    while now < seconds:
        bucket.live(now, int(write_rate / 100))  # a write every 10 ms
        granted = bucket.grant(now, 1 << 30, f"r{step % replicas}")
        if granted:
            bucket.charge(now, granted)
            if now >= 4.0:
                sent += granted
        now += 0.01
        step += 1
    return sent / (seconds - 4.0), bucket


def test_while_yielding_each_catching_up_replica_gets_the_write_rate_on_top_of_the_share():
    from meshq.core.throttle import LIVE_SHARE

    per_s, bucket = gains(60_000.0, 5_000.0, 1)  # writes at 5,000 B/s: almost the share (6,000)
    assert per_s == pytest.approx(60_000 * LIVE_SHARE + 5_000, rel=0.05)
    per_s, _ = gains(60_000.0, 5_000.0, 2)  # two replicas catching up: each needs the writes
    assert per_s == pytest.approx(60_000 * LIVE_SHARE + 2 * 5_000, rel=0.05)
    assert bucket.catching_up(100.0) == 0  # replicas that stopped asking are forgotten


def test_yielding_never_takes_the_copy_above_the_rate():
    per_s, bucket = gains(6_000.0, 50_000.0, 3)  # writes far faster than --copy-rate
    assert bucket.rate_now(11.99) == 6_000.0 and per_s <= 6_000 * 1.01


def test_the_write_rate_fades_once_writes_stop():
    bucket = CopyThrottle(1_000.0, 1_000)
    for step in range(100):
        bucket.live(step / 100, 1_000)  # 100,000 B/s for a second
    assert bucket.write_rate(1.0) > 50_000
    assert bucket.write_rate(6.0) < 0.01 * 100_000


def test_an_unlimited_rate_does_not_yield():
    bucket = CopyThrottle(0, 1)
    bucket.live(0.0, 1 << 20)
    assert bucket.grant(0.1, 1 << 20) == 1 << 20 and bucket.rate_now(0.1) == 0
