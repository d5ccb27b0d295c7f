"""A token bucket for the bytes a leader copies to replicas that are catching up.

Theory of operation
-------------------
A rebalance (a join, a leave, a replaced node) makes new replicas copy whole partitions from
their leaders. Unbounded, that copy takes the disk, the CPU and the link from live traffic. The
leader therefore sends at most ``rate_bytes_per_s`` to replicas that are *not in sync* (learners,
and voters that fell behind), however many partitions it leads: one bucket per node, shared by
its partitions. Followers in sync are never throttled, so live produce keeps its latency.

The bucket holds up to ``burst_bytes`` tokens and gains ``rate_bytes_per_s`` a second. A send
asks for up to its read size (``grant``) and gets what the bucket holds; a read returns whole
batches, so what is really sent may exceed the grant: ``charge`` takes the actual size and may
leave the bucket in debt, which later sends wait out. Over any window of ``T`` seconds no more than
``burst_bytes + rate_bytes_per_s × T`` plus one batch leaves. Time comes in as ``now_s`` (the core
has no clock of its own). A rate of 0 means unlimited.

Copies yield to live writes. While the node appends batches as a leader (``live``: one within
the last ``LIVE_WINDOW_S``: records, offset commits, shared-subscription state), the bucket
refills at ``LIVE_SHARE`` of the rate plus, for each replica catching up (one that asked for a
grant within the window), the rate those writes arrive at — never above the whole rate. A
replica catching up thus gains on its leader at the share or more while the writes leave room
under the rate, as it would without yielding; and it never gets more than ``--copy-rate``. Once
writes stop for ``LIVE_WINDOW_S``, the bucket refills at the whole rate again. The copy is
background work: on a busy node its CPU, disk and link go first to the writes whose latency
users see (``meshq bench rebalance`` on two shared cores: a producer's p99 during a join was
3.8× its idle p99 at 30 MB/s per node, 2.0× at 10 and 1.8× at 5; yielding a tenth while busy,
0.2-1.9×), while a quiet node still copies at the full rate. An unlimited rate stays unlimited.

The write rate is a decaying sum of the bytes appended (time constant ``LIVE_WINDOW_S``): a
steady stream of ``r`` bytes/s keeps it at ``r``; it fades once writes stop or slow down.
"""

from __future__ import annotations

import math
from typing import Any

from meshq.errors import ConfigError

MIN_GRANT_BYTES = 1  # a grant below this is "wait"
LIVE_SHARE = 1 / 10  # the share of the rate copies get while the node takes writes (30 MB/s -> 3 MB/s)
LIVE_WINDOW_S = 1.0  # writes this recent make the node "busy"


class CopyThrottle:
    """The node's budget for catch-up copies (see the module docstring)."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int) -> None:
        if not isinstance(rate_bytes_per_s, (int, float)) or isinstance(rate_bytes_per_s, bool) or rate_bytes_per_s < 0:
            raise ConfigError(f"copy rate must be >= 0 bytes/s (0: unlimited), not {rate_bytes_per_s!r}")
        if type(burst_bytes) is not int or burst_bytes <= 0:
            raise ConfigError(f"copy burst must be a positive number of bytes, not {burst_bytes!r}")
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._last_s: float | None = None
        self._live_s = float("-inf")  # when the node last appended a batch as a leader
        self._written = 0.0  # decaying sum of the bytes appended as a leader, as of ``_written_s``
        self._written_s = 0.0
        self._asking: dict[Any, float] = {}  # catching-up replica -> when it last asked for a grant
        self.bytes_sent = 0  # catch-up bytes charged so far
        self.waits = 0  # sends deferred for want of tokens

    @property
    def unlimited(self) -> bool:
        return self.rate_bytes_per_s == 0

    def live(self, now_s: float, written: int) -> None:
        """The node appended ``written`` bytes as a leader: copies yield for ``LIVE_WINDOW_S``."""
        if self.unlimited:
            return
        if self._asking or not self.yielding(now_s):
            # the time before is credited at the rate that applied then; yielding with no replica
            # catching up that rate is the share whatever the writes, so the refill can wait (one
            # call per batch a leader appends: the common case costs no refill)
            self._refill(now_s)
        self._written = self._decayed(now_s) + written
        self._written_s = now_s
        if now_s > self._live_s:
            self._live_s = now_s

    def _decayed(self, now_s: float) -> float:
        if now_s <= self._written_s:
            return self._written
        return self._written * math.exp((self._written_s - now_s) / LIVE_WINDOW_S)

    def write_rate(self, now_s: float) -> float:
        """The rate, bytes/s, at which the node appends as a leader (a decaying estimate)."""
        return self._decayed(now_s) / LIVE_WINDOW_S

    def yielding(self, now_s: float) -> bool:
        """Whether copies yield to live writes now (a leader append within ``LIVE_WINDOW_S``)."""
        return now_s - self._live_s < LIVE_WINDOW_S

    def catching_up(self, now_s: float) -> int:
        """Replicas that asked for a grant within ``LIVE_WINDOW_S`` (older ones are forgotten)."""
        asking = self._asking
        for who in [who for who, at in asking.items() if now_s - at >= LIVE_WINDOW_S]:
            del asking[who]
        return len(asking)

    def rate_now(self, now_s: float) -> float:
        """The refill rate in bytes/s that applies now (0: unlimited): the whole rate, or while
        yielding ``LIVE_SHARE`` of it plus the write rate for each replica catching up, at most the
        whole rate."""
        rate = self.rate_bytes_per_s
        if not self.yielding(now_s):
            return rate
        return min(rate, rate * LIVE_SHARE + self.write_rate(now_s) * self.catching_up(now_s))

    def _refill(self, now_s: float) -> None:
        last = self._last_s
        if last is not None and now_s > last:
            ends = self._live_s + LIVE_WINDOW_S  # when yielding stops, if no write comes before
            if last < ends < now_s:  # it stopped in between: the two parts at their own rates
                gained = (ends - last) * self.rate_now(last) + (now_s - ends) * self.rate_bytes_per_s
            else:
                gained = (now_s - last) * self.rate_now(last)
            self._tokens = min(float(self.burst_bytes), self._tokens + gained)
        if last is None or now_s > last:
            self._last_s = now_s

    def grant(self, now_s: float, wanted: int, who: Any = None) -> int:
        """How many of ``wanted`` bytes may be read for a catch-up send now (0: wait). ``who`` names
        the replica asking (its peer and partition): while yielding, each adds the write rate."""
        if self.unlimited:
            return wanted
        self._refill(now_s)
        if who is not None:
            self._asking[who] = now_s
        granted = int(min(wanted, self._tokens))
        if granted < MIN_GRANT_BYTES:
            self.waits += 1
            return 0
        return granted

    def charge(self, now_s: float, sent: int) -> None:
        """``sent`` bytes left for a catch-up replica (possibly more than granted: whole batches)."""
        self.bytes_sent += sent
        if self.unlimited:
            return
        self._refill(now_s)
        self._tokens -= sent
        assert self._tokens >= -float(sent), "a charge never exceeds the grant by more than the send itself"

    def tokens(self, now_s: float) -> float:
        """Bytes that may be sent now (negative: debt still to wait out)."""
        self._refill(now_s)
        return self._tokens
