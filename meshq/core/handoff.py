"""When a partition leader hands its leadership over: back to the preferred replica, or away from itself when slow.

Theory of operation
-------------------
A Raft leadership transfer (``repl_timeout_now``) stops the leader's writes until the target
has won its election: a short interruption, but one. Two rules decide when it is worth it; the
``Replica`` asks them at every heartbeat and carries the transfer out. Everything here is pure
data: time comes in as ``now_s`` and is counted in election timeouts (``election_timeout_s``).

**Move-back to the preferred replica** (``steady_enough``). The first replica of the
assignment (the ring owner) should lead, so leadership stays balanced over the nodes: a leader
that has led for two election timeouts hands over to it once it holds the whole log and is in
contact (``Replica._maybe_hand_off``). The exception is a preferred replica that handed
leadership over because it was slow: it gets leadership back only once it has been *steady*
for ``STABILITY_ELECTIONS`` election timeouts counted from the hand-off. The leader tracks every
follower's steadiness (``FollowerProgress.steady_since_s``): a heartbeat that finds it out of
contact (silent for more than two heartbeats) or slow next to the other followers
(``peer_slow``), and a voter's refusal of an append (its storage is full, its log diverged),
restart its window. (A stability window before every move-back, so that a heal costs one
interruption instead of two, shifts the simulator's pinned runs and is not part of this rule.)

**A slow leader hands over** (``CommitClock`` and ``leader_slow``). With a replication factor
of 3 or more a quorum commit needs only the fastest follower(s), so when the leader's own
commit latency (local append to the high watermark covering it) is high although the
followers store quickly, the common factor is the leader (its link, its disk, its CPU). The
rule (conservative: it must never fire on ordinary jitter and drops): at every heartbeat, the
commits of the last ``SLOW_SAMPLE_ELECTIONS`` election timeouts (at least ``SLOW_MIN_COMMITS``
of them) have a median latency above both ``SLOW_FLOOR_S`` (150 ms) and ``SLOW_FACTOR`` (4)
times the followers' own reported local hold time — and at most an election timeout (a longer
median is a replication stall, not a slow link) (the time a follower
kept an append before acknowledging it: its fsync with ``fsync=always``); when that has held at
every heartbeat that had enough commits to judge (one without them changes nothing: a slow
leader's clients send less) for ``SLOW_WINDOW_ELECTIONS`` election timeouts, and this leader has led for at
least ``SLOW_MIN_LEAD_ELECTIONS`` election timeouts (``SLOW_HOLD_DOWN_ELECTIONS`` when a slow
leader handed it leadership: ``repl_timeout_now`` says ``slow``), it hands leadership over
(``Replica._successor``: the first voter in the assignment's order in contact, holding
everything committed and not slow next to the others, else the most complete voter in
contact) — never to one that does not hold everything committed, and never when there is none. The slow node is then not moved
back by preference while the new leader sees its acks as slow (``peer_slow``), and only
``STABILITY_ELECTIONS`` after it took over and after they are normal again (its window starts
at the hand-off, as a failover starts the preferred replica's). The hold-down bounds flapping
when the whole network, not one leader, is slow: every leader then sees the same latency; the
successor of a slow leader does not hand over for slowness for ``SLOW_HOLD_DOWN_ELECTIONS``,
and a move-back comes at most one stability window after a slow hand-off — so a slow hand-off
and a move-back (two short interruptions) at most every ``STABILITY_ELECTIONS`` +
``SLOW_WINDOW_ELECTIONS`` election timeouts (15 s with the defaults) per partition, instead of
one per window. Choosing whom to hand over to follows the assignment's order (the
first voter in contact, holding everything committed and not slow next to the others), so a
rebalance's target members take leadership before a replica on its way out.

**A leader whose storage is full hands over** (``Replica._maybe_hand_off``): it refuses every
new record (``partitions.space``) while a follower could take them, so after leading two
election timeouts it hands leadership over as a slow leader does. Its own copy stays readable and catches up once space returns; the refusals it answers
meanwhile keep the move-back from coming back to it before it is steady again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

STABILITY_ELECTIONS = 10.0  # the preferred replica must be steady this long before a move-back
SLOW_FLOOR_S = 0.15  # a median commit latency below this is never "slow" (far above a LAN's)
SLOW_FACTOR = 4.0  # ... nor one below this many times the followers' own hold time
SLOW_WINDOW_ELECTIONS = 5.0  # slow at every judged heartbeat this long before handing over
SLOW_SAMPLE_ELECTIONS = 2.0  # each heartbeat judges the commits of this many election timeouts
SLOW_MIN_COMMITS = 3  # ... and only when there were at least this many
SLOW_MIN_LEAD_ELECTIONS = 3.0  # a leader elected hands over for slowness only after leading this long
SLOW_HOLD_DOWN_ELECTIONS = 30.0  # ... one that was handed leadership only after leading this long
LATENCY_SAMPLES = 512  # commit latencies kept (the judgement looks at the last election timeout)
EWMA_WEIGHT = 0.2  # weight of a new sample in a follower's ack latency and hold time


class CommitClock:
    """Leader: how long each local append waited until the high watermark covered it."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, float]] = deque()  # (end offset of an append, appended at)
        self.samples: deque[tuple[float, float]] = deque(maxlen=LATENCY_SAMPLES)  # (committed at, latency)

    def clear(self) -> None:
        self._pending.clear()
        self.samples.clear()

    def appended(self, end: int, now_s: float) -> None:
        """The leader stored records up to ``end`` (exclusive) at ``now_s``."""
        if not self._pending or end > self._pending[-1][0]:
            self._pending.append((end, now_s))

    def committed(self, high_watermark: int, now_s: float) -> None:
        """The high watermark reached ``high_watermark``: every append it covers is committed now."""
        while self._pending and self._pending[0][0] <= high_watermark:
            _end, appended_s = self._pending.popleft()
            self.samples.append((now_s, now_s - appended_s))

    def recent(self, now_s: float, window_s: float) -> list[float]:
        """Latencies of the commits of the last ``window_s``."""
        return [latency for at_s, latency in self.samples if now_s - at_s <= window_s]


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def leader_slow(latencies: list[float], follower_hold_s: list[float],
                ceiling_s: float = float("inf")) -> bool | None:
    """The slow-leader test for one heartbeat (see the module docstring): the commits' median
    latency above the floor and ``SLOW_FACTOR`` times the followers' hold time;
    None when there were too few commits to judge. A median above ``ceiling_s`` (an election
    timeout) is no slow leader but a stall — followers paused or cut off, which elections
    handle — and counts as not slow."""
    if len(latencies) < SLOW_MIN_COMMITS:
        return None
    hold = min(follower_hold_s, default=0.0)  # the fastest follower is the one a quorum waits for
    threshold = max(SLOW_FLOOR_S, SLOW_FACTOR * hold)
    middle = median(latencies)
    return ceiling_s >= middle > threshold


def peer_slow(ack_s: float | None, others_ack_s: list[float]) -> bool:
    """A follower's ack latency is known and above the floor and ``SLOW_FACTOR`` times the best
    of the other followers' (the link or node behind it is the slow one)."""
    if ack_s is None:
        return False
    return ack_s > max(SLOW_FLOOR_S, SLOW_FACTOR * min(others_ack_s, default=0.0))


def steady_enough(steady_since_s: float, now_s: float, election_timeout_s: float) -> bool:
    """The preferred replica has been steady for the stability window."""
    return now_s - steady_since_s >= STABILITY_ELECTIONS * election_timeout_s


class SlowWatch:
    """Leader: since when its commits have been slow at every heartbeat."""

    def __init__(self) -> None:
        self.slow_since_s: float | None = None

    def check(self, now_s: float, slow: bool | None) -> None:
        """One heartbeat's judgement: slow, not slow (the window starts again), or None — too
        few commits to tell (a slow leader's clients send less): nothing changes."""
        if slow is None:
            return
        if not slow:
            self.slow_since_s = None
        elif self.slow_since_s is None:
            self.slow_since_s = now_s

    def due(self, now_s: float, leader_since_s: float, slow_hand_off: bool, election_timeout_s: float) -> bool:
        """Slow for the whole window, and leading long enough to hand over for it (``slow_hand_off``:
        a slow leader handed us leadership — the hold-down)."""
        lead = SLOW_HOLD_DOWN_ELECTIONS if slow_hand_off else SLOW_MIN_LEAD_ELECTIONS
        return (self.slow_since_s is not None
                and now_s - self.slow_since_s >= SLOW_WINDOW_ELECTIONS * election_timeout_s
                and now_s - leader_since_s >= lead * election_timeout_s)


def ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_WEIGHT * (sample - old)
