"""A partition leader's view of its followers: how far each one matches, and who is in sync.

Theory of operation
-------------------
For each member of the replica set but itself (voters and learners) the leader keeps a
``FollowerProgress``: where the next append starts, how much of the log the follower is known
to hold (``match_end``), how many appends are in flight, when it last sent to it and heard from
it, and the newest configuration version it said it knows. ``Followers`` is that table — a
dict from member to progress, so the replica iterates over it as before — plus the queries the
leader answers from it. A new leadership starts every follower at the leader's end offset,
matched nowhere and just heard from (``start_epoch``); a configuration change keeps the
progress of those that stay and starts the new ones the same way (``track``). Answers to
appends move a progress forward (``matched``) or back to the follower's hint (``refused``).

The queries:

* ``heard_from_majority`` — the lease and check-quorum: the leader plus the voters that
  answered within a window make a majority.
* ``in_sync`` — voters that answered within ``replica_lag_s`` and hold what the leader held
  ``replica_lag_s`` ago. The leader samples its own end offset at every heartbeat
  (``sample_end``); the yardstick is the newest sample at least ``replica_lag_s`` old, never
  below the epoch's start, so a follower is not dropped for the records still on the wire.
* ``caught_up`` / ``in_contact`` — what a configuration step needs: members (learners
  included) that hold everything committed and the yardstick, or that merely answered.
* ``established`` — a majority of the current voters know the configuration's version and
  hold the log up to where the leader adopted it (the gate for the next step).
* ``most_complete_voter`` — whom a leader leaving the voters hands leadership to.

The table knows nothing of the configuration or the log: the voter set, the quorum, the epoch
start and the log end are handed in by the ``Replica`` at each call, so a configuration change
takes effect at once and the replica's own ``quorum`` stays the one rule for majorities. It is
pure data: time comes in as ``now_s``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

END_SAMPLES = 64  # heartbeats' worth of own end offsets kept for the in-sync yardstick


@dataclass(slots=True)
class FollowerProgress:
    """What the leader knows of one follower."""

    next_offset: int
    match_end: int = -1  # exclusive end of the prefix known to equal the leader's; -1: unknown
    in_flight: int = 0
    last_send_s: float = float("-inf")
    last_contact_s: float = float("-inf")
    cv: int = -1  # the highest configuration version the follower said it knows
    probe_s: float = float("-inf")  # when an append to it last carried our clock (a round-trip probe)
    peer_ts: float = -1.0  # the follower's clock from its last answer, to echo in our next append; -1: none
    peer_ts_at: float = 0.0  # ... and when that answer came (the echo says how long we held it)

    def answered(self, cv: int, now_s: float) -> None:
        """An answer to one of our appends arrived (accepted or not)."""
        self.cv = max(self.cv, cv)
        self.last_contact_s = now_s
        self.in_flight = max(0, self.in_flight - 1)

    def add_probe(self, body: dict, now_s: float, interval_s: float, max_held_s: float, latency: Any) -> None:
        """Round-trip probe fields for an append to this follower (``meshq.core.partitions.latency``): our clock
        and how late our timers run (``latency.lag``, when known) at most once per ``interval_s``, and the echo of
        its last clock with how long we held it (dropped when held longer than ``max_held_s``: it may be from
        before the follower restarted)."""
        if now_s - self.probe_s >= interval_s:
            self.probe_s = now_s
            body["ts"] = now_s
            lag = latency.lag(now_s)
            if lag is not None:
                body["lag"] = lag
        if self.peer_ts >= 0:
            held = now_s - self.peer_ts_at
            if held <= max_held_s:
                body["echo"], body["held"] = self.peer_ts, held
            self.peer_ts = -1.0

    def matched(self, match_end: int, log_end: int) -> None:
        """The follower holds our log up to ``match_end`` (exclusive)."""
        if match_end > self.match_end:
            self.match_end = min(match_end, log_end)
        if self.next_offset < self.match_end:
            self.next_offset = self.match_end

    def refused(self, hint: int) -> bool:
        """The follower refused an append; whether its position moved back (progress).

        The hint is where the follower's log ends or where its diverging epoch run starts: it
        only decreases while the logs disagree, so this converges on the match point.
        """
        before = self.next_offset
        self.next_offset = min(self.next_offset, hint)
        self.match_end = min(self.match_end, self.next_offset)
        self.in_flight = 0
        return self.next_offset < before


class Followers(dict[str, FollowerProgress]):
    """The leader's table of follower progress and the queries over it. See the module docstring."""

    def __init__(self, leader_id: str, replica_lag_s: float) -> None:
        super().__init__()
        self.leader_id = leader_id
        self.replica_lag_s = replica_lag_s
        self._end_samples: deque[tuple[float, int]] = deque(maxlen=END_SAMPLES)  # (time, own end)
        # ``_lagged_end``'s scan so far: (samples at or before the last cutoff, the greatest end among them),
        # valid while the samples are unchanged and the cutoff does not go back; None: scan from the start
        self._lag_scan: tuple[int, int | None] | None = None
        self._lag_cutoff = float("-inf")

    # ------------------------------------------------------------------ changes
    def start_epoch(self, members: Iterable[str], epoch_start: int, now_s: float) -> None:
        """A new leadership from ``epoch_start``: forget everything, start every member there."""
        self.clear()
        self.track(members, epoch_start, now_s)
        self._end_samples.clear()
        self._end_samples.append((now_s, epoch_start))
        self._lag_scan = None

    def track(self, members: Iterable[str], next_offset: int, now_s: float) -> list[str]:
        """Follow exactly ``members`` (but the leader): drop the others, start the new ones at
        ``next_offset`` as just heard from. Returns the new ones, in ``members`` order."""
        members = list(members)
        for peer in list(self):
            if peer not in members:
                del self[peer]
        added = []
        for peer in members:
            if peer != self.leader_id and peer not in self:
                self[peer] = FollowerProgress(next_offset, last_contact_s=now_s)
                added.append(peer)
        return added

    def sample_end(self, now_s: float, end: int) -> None:
        """Remember the leader's own end offset now (taken at every heartbeat)."""
        self._end_samples.append((now_s, end))
        self._lag_scan = None  # (a full deque drops its oldest sample: the positions moved)

    # ------------------------------------------------------------------ queries
    def heard_from_majority(self, now_s: float, window_s: float, voters: Collection[str], quorum: int) -> bool:
        heard = 1 + sum(1 for peer, f in self.items()
                        if peer in voters and now_s - f.last_contact_s <= window_s)
        return heard >= quorum

    def in_sync(self, now_s: float, voters: Collection[str], epoch_start: int, end: int) -> list[str]:
        """The leader and the voters that hold (nearly) everything it holds, sorted."""
        yardstick = self._lagged_end(now_s, epoch_start, end)
        members = [self.leader_id]
        for peer, f in sorted(self.items()):
            if (peer in voters and now_s - f.last_contact_s <= self.replica_lag_s
                    and f.match_end >= yardstick):
                members.append(peer)
        return sorted(members)

    def is_in_sync(self, peer: str, now_s: float, voters: Collection[str], epoch_start: int, end: int) -> bool:
        """``peer`` (not the leader) is among ``in_sync``: the same rule for one follower, without the list."""
        f = self.get(peer)
        return (f is not None and peer in voters and now_s - f.last_contact_s <= self.replica_lag_s
                and f.match_end >= self._lagged_end(now_s, epoch_start, end))

    def caught_up(self, now_s: float, high_watermark: int, epoch_start: int, end: int) -> set[str]:
        """The leader and the members in contact that hold everything committed and the yardstick."""
        need = max(high_watermark, self._lagged_end(now_s, epoch_start, end))
        return {self.leader_id} | {peer for peer, f in self.items()
                                   if now_s - f.last_contact_s <= self.replica_lag_s and f.match_end >= need}

    def in_contact(self, now_s: float) -> set[str]:
        """The leader and the members that answered within ``replica_lag_s``."""
        return {self.leader_id} | {peer for peer, f in self.items()
                                   if now_s - f.last_contact_s <= self.replica_lag_s}

    def established(self, voters: Collection[str], version: int, config_end: int, quorum: int) -> bool:
        """A majority of ``voters`` know ``version`` and hold the log up to ``config_end``."""
        count = 1 if self.leader_id in voters else 0
        for peer, f in self.items():
            if peer in voters and f.cv >= version and f.match_end >= config_end:
                count += 1
        return count >= quorum

    def most_complete_voter(self, now_s: float, voters: Collection[str]) -> str | None:
        """The voter in contact that holds the most of the log (ties: the greatest name), or None."""
        best = max(((f.match_end, peer) for peer, f in self.items()
                    if peer in voters and now_s - f.last_contact_s <= self.replica_lag_s), default=None)
        return None if best is None else best[1]

    def _lagged_end(self, now_s: float, epoch_start: int, end: int) -> int:
        """Own end offset as it was ``replica_lag_s`` ago (what an in-sync follower must have): the greatest
        end among the samples up to the first one newer than the cutoff, never below ``epoch_start``.

        Asked on every append and answer; the samples change only at heartbeats and the cutoff only moves
        forward, so the scan resumes where the last call stopped (``_lag_scan``) instead of walking all
        ``END_SAMPLES`` each time."""
        cutoff = now_s - self.replica_lag_s
        samples = self._end_samples
        scan = self._lag_scan
        if scan is None or cutoff < self._lag_cutoff:
            count, top = 0, None
        else:
            count, top = scan
        size = len(samples)
        while count < size:
            sample_s, sample_end = samples[count]
            if sample_s > cutoff:
                break
            if top is None or sample_end > top:
                top = sample_end
            count += 1
        self._lag_scan = (count, top)
        self._lag_cutoff = cutoff
        yardstick = epoch_start if top is None or top < epoch_start else top
        return yardstick if yardstick < end else end
