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
    bucket.live(0.0, 100)  # a write taken as a leader
    assert bucket.yielding(0.5) and bucket.rate_now(0.5) == pytest.approx(6000.0 * LIVE_SHARE)
    assert bucket.grant(0.5, 10_000) == pytest.approx(0.5 * 6000 * LIVE_SHARE, abs=1)
    bucket.charge(0.5, bucket.grant(0.5, 10_000))
    quiet = LIVE_WINDOW_S + 0.5  # no write for longer than the window: the whole rate
    assert not bucket.yielding(quiet) and bucket.rate_now(quiet) == 6000.0
    bucket.live(quiet, 100)  # the time before the write counts at the whole rate
    assert bucket.tokens(quiet) == pytest.approx((quiet - 0.5) * 6000.0, abs=1)


def test_a_steady_stream_of_writes_holds_the_copy_to_its_share_and_never_to_zero():
    from meshq.core.throttle import LIVE_SHARE

    bucket = CopyThrottle(10_000.0, 2_000)
    sent, now = 0, 0.0
    while now < 20.0:
        bucket.live(now, 1)  # a write of 1 byte every 10 ms (100 B/s)
        granted = bucket.grant(now, 3_000)
        if granted:
            bucket.charge(now, granted)
            sent += granted
        now += 0.01
    assert 0.9 * 10_000 * LIVE_SHARE * 20 <= sent <= 2_000 + (10_000 * LIVE_SHARE + 100) * 20 + 3_000


def test_an_unlimited_rate_does_not_yield():
    bucket = CopyThrottle(0, 1)
    bucket.live(0.0, 1 << 20)
    assert bucket.grant(0.1, 1 << 20) == 1 << 20 and bucket.rate_now(0.1) == 0


def test_while_yielding_a_copy_still_gains_on_writes_faster_than_its_share():
    from meshq.core.throttle import LIVE_SHARE

    bucket = CopyThrottle(6_000.0, 1_000)
    now, sent = 0.0, 0
    while now < 10.0:
        bucket.live(now, 50)  # 5,000 B/s of writes: several times the share
        granted = bucket.grant(now, 10_000)
        if granted:
            bucket.charge(now, granted)
            if now >= 2.0:  # (the write rate is known after a whole window)
                sent += granted
        now += 0.01
    share_plus_writes = (6_000.0 * LIVE_SHARE + 5_000) * 8.0
    assert 0.9 * share_plus_writes <= sent <= share_plus_writes + 1_000 + 10_000
    assert bucket.rate_now(now) == pytest.approx(6_000.0 * LIVE_SHARE + 5_000, rel=0.05)
