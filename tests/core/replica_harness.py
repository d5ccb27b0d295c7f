"""A tiny deterministic harness for meshq.core.replica.Replica: N replicas of one partition,
each over its own MemoryStorage, a fake clock, and an in-memory network pumped by hand.

The network can drop messages to/from a node ("down"), cut single directed links, hold
messages matching a predicate (to release them later: delay, reorder), duplicate and
reorder. Syncs requested by a replica are performed when the network is pumped, unless
auto-sync is switched off for that node. Nothing here reads a real clock or global
randomness, so every run of a test is identical.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshq.core import batch as batch_format
from meshq.core.partition import PartitionState
from meshq.core.replica import LEADER, Replica
from meshq.log.memory import MemoryStorage

TOPIC = "t"
PARTITION = 0
WALL_MS = 1_700_000_000_000
START_S = 100.0
TIMING = {"election_timeout_s": 1.0, "heartbeat_interval_s": 0.15, "replica_lag_s": 3.0}


@dataclass
class Msg:
    src: str
    dst: str
    type: str
    body: dict
    payloads: tuple
    seq: int
    sent_s: float
    due_s: float = float("-inf")  # not delivered before this (``Cluster.link_delay``)

    def first_base_offset(self) -> int | None:
        """Base offset of the first batch a repl_append carries (None for a heartbeat)."""
        if self.type != "repl_append" or not self.payloads or not self.payloads[0]:
            return None
        return batch_format.parse_header(self.payloads[0]).base_offset


@dataclass
class Node:
    """One replica plus what its callbacks recorded."""

    node_id: str
    replicas: list[str]
    seed: int
    fsync_always: bool
    timing: dict
    cluster: Cluster
    latency: Any = None  # the node's round-trip table (meshq.core.partitions.latency), shared by its replicas
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    saved: dict | None = None
    save_count: int = 0
    changes: int = 0
    follower_appends: int = 0
    sync_requested: bool = False
    auto_sync: bool = True
    truncations: list[int] = field(default_factory=list)
    replica: Any = None
    state: Any = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.build()

    def build(self) -> None:
        """(Re)create the Replica over this node's storage and last saved dict (a restart)."""
        log = self.storage.open_log(TOPIC, PARTITION)
        state = PartitionState(TOPIC, PARTITION, log)
        original_truncate = state.truncate

        def truncate(offset: int) -> None:
            self.truncations.append(offset)
            original_truncate(offset)

        state.truncate = truncate
        self.state = state
        self.sync_requested = False
        replica: Replica | None = None

        def send(peer: str, type_: str, body: dict, payloads: tuple) -> None:
            if replica is self.replica:  # a replaced (restarted) replica is dead
                self.cluster.on_send(self.node_id, peer, type_, body, payloads)

        replica = Replica(
            self.node_id, state, self.replicas, copy.deepcopy(self.saved), self.rng,
            send=send, save=self._save, request_sync=self._request_sync,
            on_change=self._on_change, on_follower_append=self._on_follower_append,
            wall_clock_ms=lambda: WALL_MS, fsync_always=self.fsync_always, latency=self.latency, **self.timing,
        )
        self.replica = replica

    def _save(self, value: dict) -> None:
        self.saved = copy.deepcopy(value)
        self.save_count += 1

    def _request_sync(self) -> None:
        self.sync_requested = True

    def _on_change(self) -> None:
        self.changes += 1

    def _on_follower_append(self) -> None:
        self.follower_appends += 1

    # -- inspection
    @property
    def log(self) -> Any:
        return self.state.log

    def batches(self) -> list[bytes]:
        """Every batch of the log, as stored (bytes)."""
        log = self.log
        data = log.read(log.start_offset, 1 << 40) if log.end_offset > log.start_offset else b""
        return [bytes(data[pos:pos + header.size]) for pos, header in batch_format.iter_batches(data)]

    def headers(self) -> list[batch_format.BatchHeader]:
        return [batch_format.parse_header(b) for b in self.batches()]

    def batches_below(self, offset: int) -> list[bytes]:
        return [b for b in self.batches() if batch_format.parse_header(b).next_offset <= offset]

    def check_recent_matches_log(self) -> None:
        """The newest batches a replica keeps in memory are exactly the log's bytes at those offsets."""
        log = self.log
        for offset in range(log.start_offset, log.end_offset):
            for max_bytes in (1, 1 << 30):
                recent = self.state.read_recent(offset, max_bytes)
                if recent is None:
                    continue
                data, base, next_offset = recent
                assert data == log.read(offset, max_bytes), f"{self.node_id}: recent batches differ at {offset}"
                headers = [h for _pos, h in batch_format.iter_batches(data)]
                assert (base, next_offset) == (headers[0].base_offset, headers[-1].next_offset)

    def sync(self) -> None:
        self.log.sync()
        self.sync_requested = False
        self.replica.on_synced(self.cluster.now)


class Cluster:
    """N replicas of partition (TOPIC, PARTITION) and the network between them."""

    def __init__(self, ids: Iterable[str] = ("a", "b", "c"), *, replicas: list[str] | None = None, seed: int = 1,
                 fsync_always: bool = False, start: bool = True, latency: Callable[[], Any] | None = None,
                 **timing: Any) -> None:
        self.ids = list(ids)
        self.replica_ids = list(replicas) if replicas is not None else list(self.ids)
        self.timing = {**TIMING, **timing}
        self.now = START_S
        self.rng = random.Random(seed * 7919)
        self.queue: list[Msg] = []
        self.held: list[Msg] = []
        self.sent: list[Msg] = []
        self.down: set[str] = set()  # killed: no timers, every message to/from dropped
        self.paused: set[str] = set()  # frozen: no timers, no deliveries to it (messages wait)
        self.cut: set[tuple[str, str]] = set()  # directed links that drop everything
        self.hold_rules: list[Callable[[Msg], bool]] = []
        self.send_hooks: list[Callable[[Msg], None]] = []
        self.duplicate = 0.0  # probability of delivering a message twice
        self.reorder = False  # deliver queued messages in random order
        self.link_delay: dict[tuple[str, str], float] = {}  # directed link -> its one-way delay, s (0 unless set)
        self._seq = 0
        self.nodes: dict[str, Node] = {}
        for i, node_id in enumerate(self.ids):
            self.nodes[node_id] = Node(node_id, self.replica_ids, seed * 1000 + i, fsync_always, self.timing, self,
                                       latency=latency() if latency is not None else None)
        if start:
            for node_id in self.ids:
                self.start(node_id)
            self.pump()

    # -- nodes
    def __getitem__(self, node_id: str) -> Replica:
        return self.nodes[node_id].replica

    def start(self, node_id: str) -> None:
        """What NodeCore does when it opens a replica: start, then campaign at once if due."""
        replica = self.nodes[node_id].replica
        replica.start(self.now)
        if replica.next_deadline() <= self.now:
            replica.on_timer(self.now)

    def restart(self, node_id: str, crash: bool = False) -> Replica:
        """Replace the node's Replica with a new one over the same log and saved dict."""
        node = self.nodes[node_id]
        if crash:
            node.storage.crash()  # power loss: the log keeps only what was synced
        self.queue = [m for m in self.queue if node_id not in (m.src, m.dst)]
        node.build()
        self.start(node_id)
        return node.replica

    def kill(self, node_id: str) -> None:
        self.down.add(node_id)

    def revive(self, node_id: str) -> None:
        self.down.discard(node_id)

    def isolate(self, node_id: str) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def heal(self) -> None:
        self.cut.clear()

    def live(self) -> list[str]:
        return [n for n in self.ids if n not in self.down and n not in self.paused]

    def leaders(self) -> list[str]:
        return [n for n in self.live() if self.nodes[n].replica.role == LEADER]

    def leader(self) -> str:
        leaders = self.leaders()
        assert leaders, "no live leader"
        return max(leaders, key=lambda n: self.nodes[n].replica.epoch)

    # -- network
    def on_send(self, src: str, dst: str, type_: str, body: dict, payloads: tuple) -> None:
        self._seq += 1
        msg = Msg(src, dst, type_, copy.deepcopy(body), tuple(bytes(p) for p in payloads), self._seq, self.now,
                  self.now + self.link_delay.get((src, dst), 0.0))
        self.sent.append(msg)
        self._check_persisted_before_reply(msg)
        for hook in self.send_hooks:
            hook(msg)
        self.queue.append(msg)
        if self.duplicate and self.rng.random() < self.duplicate:
            self._seq += 1
            self.queue.append(Msg(src, dst, type_, copy.deepcopy(body), msg.payloads, self._seq, self.now, msg.due_s))

    def _check_persisted_before_reply(self, msg: Msg) -> None:
        """Epoch, vote and history are saved before any answer that depends on them."""
        node = self.nodes[msg.src]
        if msg.type == "repl_vote_ok" and msg.body["granted"] and not msg.body["pre_vote"]:
            assert node.saved is not None and node.saved["epoch"] == msg.body["epoch"], "vote sent before its epoch was saved"
            assert node.saved["voted_for"] == msg.dst, "vote sent before it was saved"
        if msg.type == "repl_append_ok" and msg.body["ok"]:
            assert node.saved is not None and node.saved["epoch"] == msg.body["epoch"]
            assert node.saved["history"] == node.replica.history, "append acknowledged before its history was saved"

    def inject(self, src: str, dst: str, type_: str, body: dict, payloads: tuple = ()) -> None:
        """Deliver a crafted message at once (ignores cuts and holds)."""
        self.nodes[dst].replica.handle(src, type_, copy.deepcopy(body), payloads, self.now)

    def hold(self, rule: Callable[[Msg], bool]) -> Callable[[Msg], bool]:
        self.hold_rules.append(rule)
        return rule

    def release(self, rule: Callable[[Msg], bool] | None = None) -> None:
        """Stop holding (one rule, or all) and queue what was held, in send order."""
        if rule is None:
            self.hold_rules.clear()
        else:
            self.hold_rules.remove(rule)
        still, freed = [], []
        for msg in self.held:
            (still if any(r(msg) for r in self.hold_rules) else freed).append(msg)
        self.held = still
        self.queue.extend(freed)

    def drop_held(self) -> None:
        self.held.clear()

    def _dropped(self, msg: Msg) -> bool:
        return (msg.dst not in self.nodes or msg.src in self.down or msg.dst in self.down
                or (msg.src, msg.dst) in self.cut)

    def deliver_one(self) -> bool:
        """Deliver (or drop, or hold) one queued message; False when nothing could move."""
        candidates = [i for i, m in enumerate(self.queue)
                      if m.due_s <= self.now and (m.dst not in self.paused or self._dropped(m))]
        if not candidates:
            return False
        index = self.rng.choice(candidates) if self.reorder else candidates[0]
        msg = self.queue.pop(index)
        if self._dropped(msg):
            return True
        if any(rule(msg) for rule in self.hold_rules):
            self.held.append(msg)
            return True
        self.nodes[msg.dst].replica.handle(msg.src, msg.type, copy.deepcopy(msg.body), msg.payloads, self.now)
        return True

    def run_syncs(self) -> bool:
        did = False
        for node_id in self.live():
            node = self.nodes[node_id]
            if node.sync_requested and node.auto_sync:
                node.sync()
                did = True
        return did

    def pump(self, max_steps: int = 200_000) -> None:
        """Deliver everything deliverable and perform requested syncs, without advancing time."""
        for _ in range(max_steps):
            if not self.deliver_one() and not self.run_syncs():
                return
        raise AssertionError("network did not settle")

    # -- time
    def run_timers(self) -> bool:
        ran = False
        for node_id in self.live():
            replica = self.nodes[node_id].replica
            if replica.next_deadline() <= self.now:
                replica.on_timer(self.now)
                ran = True
        return ran

    def advance(self, dt: float) -> None:
        """Let ``dt`` seconds pass, firing every timer when it is due (NodeCore's discipline)."""
        until = self.now + dt
        self.pump()
        for _ in range(1_000_000):
            if self.run_timers():
                self.pump()
                continue
            deadlines = [self.nodes[n].replica.next_deadline() for n in self.live()]
            deadlines += [m.due_s for m in self.queue if m.due_s > self.now]  # delayed messages (link_delay)
            nxt = min(deadlines, default=float("inf"))
            if nxt > until:
                self.now = until
                self.pump()
                return
            self.now = max(self.now, nxt)
            self.pump()  # delayed messages now due
        raise AssertionError("timers did not settle")

    def run_until(self, predicate: Callable[[], bool], timeout_s: float = 30.0, step_s: float = 0.01) -> None:
        deadline = self.now + timeout_s
        self.pump()
        while not predicate():
            if self.now >= deadline:
                raise AssertionError(f"condition not reached within {timeout_s}s")
            self.advance(step_s)

    # -- clients
    def write(self, node_id: str, values: list[bytes], check_lease: bool = True) -> int:
        """A leader write as NodeCore does it; returns the exclusive end offset of the records."""
        node = self.nodes[node_id]
        replica = node.replica
        assert replica.is_leader, f"{node_id} does not lead"
        if check_lease:
            assert replica.lease_valid(self.now), f"{node_id}'s lease is not valid"
        data = batch_format.encode_batch([(None, v, None, WALL_MS) for v in values])
        base, duplicate = node.state.append(data, batch_format.parse_header(data), WALL_MS)
        assert not duplicate
        if replica.fsync_always:
            node.sync_requested = True  # NodeCore asks for a sync after every leader append
        replica.on_local_append(self.now)
        return base + len(values)

    # -- invariants
    def check_committed_agree(self) -> None:
        """Logs agree byte for byte on every batch below both replicas' high watermarks."""
        for i, x in enumerate(self.ids):
            for y in self.ids[i + 1:]:
                nx, ny = self.nodes[x], self.nodes[y]
                bound = min(nx.replica.high_watermark, ny.replica.high_watermark)
                assert nx.batches_below(bound) == ny.batches_below(bound), f"{x} and {y} disagree below {bound}"
        for node in self.nodes.values():
            assert node.replica.high_watermark <= node.log.end_offset
            node.check_recent_matches_log()
