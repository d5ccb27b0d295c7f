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

Copies yield to live writes. While the node takes produce requests as a leader (``live``: one
within the last ``LIVE_WINDOW_S``), the bucket refills at ``LIVE_SHARE`` of the rate *plus* the
rate at which those writes arrive (bytes appended in the last whole window), so a replica that
catches up always gains on its leader, however fast the partitions grow; once writes stop for
``LIVE_WINDOW_S``, at the whole rate again. The copy is background work: on a busy node its CPU,
disk and link go first to the writes whose latency users see (``meshq bench rebalance`` on two
shared cores: a producer's p99 during a join was 3.8× its idle p99 at 30 MB/s per node, 2.0× at
10 and 1.8× at 5; with a tenth while busy, 0.2-1.9×), while a quiet node still copies at the
full rate. An unlimited rate stays
unlimited.
"""

from __future__ import annotations

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
        self._live_s = float("-inf")  # when the node last took a write as a leader
        self._window_s = float("-inf")  # the start of the window whose written bytes are being counted
        self._window_bytes = 0
        self._write_rate = 0.0  # bytes/s written in the last whole window (0 after a window without writes)
        self.bytes_sent = 0  # catch-up bytes charged so far
        self.waits = 0  # sends deferred for want of tokens

    @property
    def unlimited(self) -> bool:
        return self.rate_bytes_per_s == 0

    def live(self, now_s: float, written: int) -> None:
        """The node took a write of ``written`` bytes as a leader: copies yield for ``LIVE_WINDOW_S``."""
        if self.unlimited:
            return
        if not self.yielding(now_s):
            self._refill(now_s)  # (the time before counts at the whole rate)
        if now_s - self._window_s >= LIVE_WINDOW_S:  # a window is over: its bytes give the write rate
            whole = now_s - self._window_s < 2 * LIVE_WINDOW_S
            self._write_rate = self._window_bytes / LIVE_WINDOW_S if whole else 0.0
            self._window_s, self._window_bytes = now_s, 0
        self._window_bytes += written
        self._live_s = max(self._live_s, now_s)

    def yielding(self, now_s: float) -> bool:
        """Whether copies yield to live writes now (a write within ``LIVE_WINDOW_S``)."""
        return now_s - self._live_s < LIVE_WINDOW_S

    def rate_now(self, now_s: float) -> float:
        """The refill rate in bytes/s that applies now (0: unlimited): the whole rate, or while
        yielding ``LIVE_SHARE`` of it plus the rate the writes arrive at."""
        if self.yielding(now_s):
            return self.rate_bytes_per_s * LIVE_SHARE + self._write_rate
        return self.rate_bytes_per_s

    def _refill(self, now_s: float) -> None:
        if self._last_s is not None and now_s > self._last_s:
            # the time since the last refill at the rate of now: busy at the share (writes came within the
            # window), else the whole rate; a change between refills, which come at every grant, counts late
            self._tokens = min(float(self.burst_bytes), self._tokens + (now_s - self._last_s) * self.rate_now(now_s))
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
