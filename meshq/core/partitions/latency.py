"""Round trips to the other storage nodes, measured by partition replication, and which peer is slow.

Theory of operation
-------------------
A leader whose link is slow but alive (a saturated uplink, heavy loss that TCP hides behind
retransmissions, a starved CPU) keeps its lease, so no election moves its partitions, and every
write to them waits for it. To hand such partitions over, a node needs to know that one peer is far
slower than the others *from where it stands*. Replication measures it for free:

* Every partition leader stamps, at most once per heartbeat interval per follower, its own clock in
  an append (``ts``); the follower echoes it in its answer (``echo``), so the leader has one round
  trip. The answer also carries the follower's own clock (``ts``), which the leader echoes in its
  next append to that follower with how long it held it (``held``): the follower gets one round trip
  too. Each side subtracts only its own clock values, so clocks need not agree.
* All the node's replicas feed one ``PeerLatency``: per peer the last ``SAMPLES`` round trips,
  at most one per ``SPACING_S`` (the others are dropped). A peer's estimate is the median of those
  taken within ``WINDOW_S`` (at least ``MIN_SAMPLES`` of them), so one late answer moves nothing and
  a peer that stopped answering has no estimate. The spacing matters: a node that was paused (or
  whose peer was) finds a backlog of probes on waking, one per partition, all as old as the pause;
  counted alone they would fill the table at once and call a healthy link slow. Spaced, the backlog
  is one sample, and slowness must last for about half the table (~0.5 s or more) to count.

* A leader starved of CPU (stopped, or given a core only now and then) runs in bursts: what it sends
  in one burst is answered within it, so most of the round trips above look fast. Its timers say it
  better: every leader notes how late its heartbeat timers run (``note_lag``), and each probe it
  sends carries the median of those (``lag``), which its followers keep per peer (``note_peer_lag``)
  as they keep round trips.

**The rule.** A peer is *slow* when its estimate is at least ``SLOW_FLOOR_S`` and at least
``SLOW_FACTOR`` times the median estimate of the node's other peers (there must be one), or when the
lag it reports is at least ``SLOW_FLOOR_S`` and at least ``SLOW_FACTOR`` times the median of the
lags known for the other nodes (this node's own and what its other peers report; there must be
one). A node whose own link is slow sees every peer slow alike, so it calls none of them slow; only
nodes with a fast link of their own single out the slow one. Likewise a machine loaded as a whole
runs every node's timers late alike, and a node whose own timers run ``SLOW_FLOOR_S`` late or more
accuses nobody by lag. A node's own lag is measured only while it leads (and kept ``WINDOW_S``), so a
node that leads nothing reports none and is judged by its round trips alone.

A leader whose own timers run on time never hands leadership to an asker it finds slow itself (a
starved follower hears its leader only between its pauses and finds it slow, while the leader's round
trips to it are slow because it answers late); such a request does not count towards a majority.

``meshq.core.replica`` acts on it: a follower that
finds its leader slow asks it to step aside (``repl_step_aside``); the leader does so — handing
leadership to that follower — only if it is in sync and the leader has evidence of its own: its
round trip to that follower is at least ``SLOW_FLOOR_S`` too (``link_slow``), or its own timers run
that late (``starved``: a leader starved of CPU runs in bursts, and what it sends in one is answered
within it, so its round trips look fast), or a majority of its other voters asked. No leader hands
leadership to a preferred replica it finds slow, so the partition does not bounce back until the
link is fast again.

Pure data: time comes in as ``now_s``.
"""

from __future__ import annotations

from collections import deque

SAMPLES = 8  # round trips kept per peer
SPACING_S = 0.1  # at most one round trip per peer this often: a burst (a pause's backlog) counts once
MIN_SAMPLES = 3  # fewer recent ones than this: no estimate
WINDOW_S = 10.0  # only round trips taken this recently count
SLOW_FLOOR_S = 0.03  # a peer is never slow below this round trip (loopback and LAN: well under 5 ms)
SLOW_FACTOR = 8.0  # ... and only when this many times slower than the median of the other peers


def _keep(samples: deque[tuple[float, float]], value: float, now_s: float) -> None:
    """Append ``(now_s, value)`` unless it is negative (a clock jump) or within ``SPACING_S`` of the last one kept."""
    if value >= 0 and (not samples or now_s - samples[-1][0] >= SPACING_S):
        samples.append((now_s, value))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _note(table: dict[str, deque[tuple[float, float]]], peer: str, value: float, now_s: float) -> None:
    """Keep ``value`` in ``peer``'s samples of ``table`` (see ``_keep``)."""
    samples = table.get(peer)
    if samples is None:
        samples = table[peer] = deque(maxlen=SAMPLES)
    _keep(samples, value, now_s)


def _estimate(table: dict[str, deque[tuple[float, float]]], peer: str, now_s: float) -> float | None:
    """The median of ``peer``'s recent samples in ``table`` (see ``_recent_median``)."""
    samples = table.get(peer)
    return _recent_median(samples, now_s) if samples else None


def _others(table: dict[str, deque[tuple[float, float]]], peer: str, now_s: float) -> list[float]:
    """The estimates of every peer of ``table`` but ``peer`` that has one."""
    return [value for other in table if other != peer for value in (_estimate(table, other, now_s),)
            if value is not None]


def _recent_median(samples: deque[tuple[float, float]], now_s: float) -> float | None:
    """The median of the values taken within ``WINDOW_S``; None with fewer than ``MIN_SAMPLES`` of them."""
    recent = [value for when, value in samples if now_s - when <= WINDOW_S]
    return _median(recent) if len(recent) >= MIN_SAMPLES else None


class PeerLatency:
    """The node's round trips to its peers. See the module docstring."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, float]]] = {}  # peer -> (when, round trip s)
        self._lags: deque[tuple[float, float]] = deque(maxlen=SAMPLES)  # (when, how late a leader's timer ran)
        self._peer_lags: dict[str, deque[tuple[float, float]]] = {}  # peer -> (when, the lag it reported)

    def note(self, peer: str, rtt_s: float, now_s: float) -> None:
        """One round trip to ``peer`` measured now (dropped if negative, from a clock jump, or within
        ``SPACING_S`` of the last one kept)."""
        _note(self._samples, peer, rtt_s, now_s)

    def note_peer_lag(self, peer: str, lag_s: float, now_s: float) -> None:
        """``peer``, leading a partition we follow, reported how late its timers run (kept as round trips are)."""
        _note(self._peer_lags, peer, lag_s, now_s)

    def peer_lag(self, peer: str, now_s: float) -> float | None:
        """The median of the lags ``peer`` reported recently, or None with fewer than ``MIN_SAMPLES`` of them."""
        return _estimate(self._peer_lags, peer, now_s)

    def rtt(self, peer: str, now_s: float) -> float | None:
        """The median of ``peer``'s recent round trips, or None with fewer than ``MIN_SAMPLES`` of them."""
        return _estimate(self._samples, peer, now_s)

    def slow(self, peer: str, now_s: float) -> bool:
        """``peer`` is far slower than this node's other peers (the rule of the module docstring): by its round
        trip, or by the lag of its timers."""
        own = self.rtt(peer, now_s)
        if own is not None and own >= SLOW_FLOOR_S:
            others = _others(self._samples, peer, now_s)
            if others and own >= SLOW_FACTOR * _median(others):
                return True
        return self.lags_behind(peer, now_s)

    def lags_behind(self, peer: str, now_s: float) -> bool:
        """The lag ``peer`` reports is at least ``SLOW_FLOOR_S`` and ``SLOW_FACTOR`` times the median of the
        other lags known: this node's own, and those its other peers report. Never while this node's own timers
        run ``SLOW_FLOOR_S`` late or more: on a machine loaded as a whole every node's lag swings, and a node
        late itself accuses nobody."""
        lag = self.peer_lag(peer, now_s)
        if lag is None or lag < SLOW_FLOOR_S:
            return False
        own = self.lag(now_s)
        if own is not None and own >= SLOW_FLOOR_S:
            return False
        others = _others(self._peer_lags, peer, now_s)
        if own is not None:
            others.append(own)
        return bool(others) and lag >= SLOW_FACTOR * _median(others)

    def link_slow(self, peer: str, now_s: float) -> bool:
        """The round trip to ``peer`` is at least ``SLOW_FLOOR_S``, whatever the other peers' (a slow
        leader's own view of the link to a follower that asks it to step aside: it sees every link slow)."""
        rtt = self.rtt(peer, now_s)
        return rtt is not None and rtt >= SLOW_FLOOR_S

    def note_lag(self, lag_s: float, now_s: float) -> None:
        """A partition leader's heartbeat timer ran ``lag_s`` after it was due (kept as round trips are)."""
        _keep(self._lags, lag_s, now_s)

    def lag(self, now_s: float) -> float | None:
        """The median lag of this node's recent leader heartbeat timers (reported to followers in probes), or
        None with fewer than ``MIN_SAMPLES`` of them (a node that leads nothing)."""
        return _recent_median(self._lags, now_s)

    def starved(self, now_s: float) -> bool:
        """This node's own timers run late: the median lag of recent ones is at least ``SLOW_FLOOR_S`` (a CPU it
        gets only in bursts; its round trips to peers, measured within one burst, look fast)."""
        lag = self.lag(now_s)
        return lag is not None and lag >= SLOW_FLOOR_S

    def status(self, now_s: float) -> dict[str, dict]:
        """Per peer with an estimate: its round trip in ms, the lag it reports in ms (when it reports one) and
        whether it counts as slow."""
        out = {}
        for peer in sorted(self._samples):
            rtt = self.rtt(peer, now_s)
            if rtt is not None:
                out[peer] = {"rtt_ms": round(rtt * 1000, 3), "slow": self.slow(peer, now_s)}
                lag = self.peer_lag(peer, now_s)
                if lag is not None:
                    out[peer]["lag_ms"] = round(lag * 1000, 3)
        return out
