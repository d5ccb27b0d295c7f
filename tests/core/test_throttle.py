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
