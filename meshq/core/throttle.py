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
"""

from __future__ import annotations

from meshq.errors import ConfigError

MIN_GRANT_BYTES = 1  # a grant below this is "wait"


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
        self.bytes_sent = 0  # catch-up bytes charged so far
        self.waits = 0  # sends deferred for want of tokens

    @property
    def unlimited(self) -> bool:
        return self.rate_bytes_per_s == 0

    def _refill(self, now_s: float) -> None:
        if self._last_s is not None and now_s > self._last_s:
            self._tokens = min(float(self.burst_bytes), self._tokens + (now_s - self._last_s) * self.rate_bytes_per_s)
        if self._last_s is None or now_s > self._last_s:
            self._last_s = now_s

    def grant(self, now_s: float, wanted: int) -> int:
        """How many of ``wanted`` bytes may be read for a catch-up send now (0: wait)."""
        if self.unlimited:
            return wanted
        self._refill(now_s)
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
