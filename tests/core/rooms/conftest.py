"""Shared setup of the room tests: a loopback network of harness cores, and small helpers.

``Net`` wires several ``CoreHarness`` cores (one shared fake clock) into a mesh: every
``Send`` becomes a ``RequestReceived`` at its peer, every ``Reply`` a ``ReplyReceived`` back
at the sender, every ``Publish`` an ``EventReceived`` at every node that knows the publisher
(its SUB socket is connected to it), each decoded through ``meshq.core.wire`` (so every frame
is also checked against its schema). Nodes are introduced by discovery (``PeerDiscovered``),
so no seed addresses are needed. A node can be cut off (``cut``): whatever it sends or is
sent is dropped until it is healed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meshq.config import TopicConfig
from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.events import CreateTopic, EventReceived, PeerDiscovered, ReplyReceived, RequestReceived
from tests.core.harness import CoreHarness, FakeClock


class Net:
    """Harness cores pumped together by hand (see the module docstring)."""

    def __init__(self, *node_ids: str, **config: Any) -> None:
        self.clock = FakeClock()
        self.nodes: dict[str, CoreHarness] = {}
        for node_id in node_ids:
            self.add(node_id, **config)
        self.down: set[str] = set()
        # (time, source, destination, message type, delivered?) of every request and reply sent
        self.log: list[tuple[float, str, str, str, bool]] = []
        # keyed nets: (source, destination) -> the ZAP User-Id the destination's runtime would read (None: unkeyed)
        self.caller: Callable[[str, str], str | None] = lambda src, dst: None

    def add(self, node_id: str, **config: Any) -> CoreHarness:
        self.nodes[node_id] = CoreHarness(node_id, clock=self.clock, **config)
        return self.nodes[node_id]

    def __getitem__(self, node_id: str) -> CoreHarness:
        return self.nodes[node_id]

    def cut(self, *node_ids: str) -> None:
        self.down.update(node_ids)

    def heal(self, *node_ids: str) -> None:
        self.down.difference_update(node_ids or set(self.down))

    def introduce(self, *discoverers: str) -> None:
        """Let each of ``discoverers`` (default: every node) discover every other node."""
        for node_id in discoverers or tuple(self.nodes):
            for other, h in self.nodes.items():
                if other != node_id:
                    self.nodes[node_id].handle(PeerDiscovered(h.core.mesh.self_info()))

    def _link_up(self, src: str, dst: str) -> bool:
        return dst in self.nodes and src not in self.down and dst not in self.down

    def pump(self, rounds: int = 100) -> None:
        """Deliver everything in flight until the network is quiet."""
        for _ in range(rounds):
            moved = False
            for src, h in self.nodes.items():
                sent, h.sent = h.sent, []
                for send in sent:
                    moved = True
                    message = wire.decode(send.frames, h.config.cluster)
                    delivered = self._link_up(src, send.peer)
                    self.log.append((self.clock.now_s, src, send.peer, message.type, delivered))
                    if delivered:
                        self.nodes[send.peer].handle(RequestReceived(("net", src), message,
                                                                     self.caller(src, send.peer)))
                replies, h.replies = h.replies, []
                for reply in replies:
                    if not (isinstance(reply.route, tuple) and reply.route[0] == "net"):
                        h.replies.append(reply)  # an answer to a request a test handed in itself
                        continue
                    moved = True
                    message = wire.decode(reply.frames, h.config.cluster)
                    delivered = self._link_up(src, reply.route[1])
                    self.log.append((self.clock.now_s, src, reply.route[1], message.type, delivered))
                    if delivered:
                        self.nodes[reply.route[1]].handle(ReplyReceived(src, message))
                published, h.published = h.published, []
                for publish in published:
                    moved = True
                    message = wire.decode(publish.frames, h.config.cluster)
                    for dst, other in self.nodes.items():
                        if dst != src and self._link_up(src, dst) and src in other.core.members:
                            other.handle(EventReceived(message))
            if not moved:
                return

    def run(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass in steps: each node's due timers fire, then the network is pumped."""
        end = self.clock.now_s + seconds
        while self.clock.now_s < end - 1e-9:
            self.clock.now_s = min(end, self.clock.now_s + step)
            for h in self.nodes.values():
                fire_due_timers(h)
            self.pump()

    def run_until(self, condition: Callable[[], bool], within_s: float, step: float = 0.05) -> float:
        """Run until ``condition()`` holds; returns the seconds it took (fails after ``within_s``)."""
        start = self.clock.now_s
        while not condition():
            assert self.clock.now_s - start < within_s, f"not within {within_s} s"
            self.run(step, step)
        return self.clock.now_s - start

    def sent(self, src: str, type_: str, since_s: float = float("-inf")) -> list[tuple[float, str]]:
        """(time, destination) of each ``type_`` message ``src`` sent since ``since_s``."""
        return [(t, dst) for t, s, dst, kind, _delivered in self.log if s == src and kind == type_ and t >= since_s]

    def leader(self) -> CoreHarness:
        """The node that leads the metadata group (exactly one must)."""
        leaders = [h for h in self.nodes.values() if h.core.raft.role == "leader"]
        assert len(leaders) == 1, [h.core.node_id for h in leaders]
        return leaders[0]

    def form(self, within_s: float = 30.0) -> CoreHarness:
        """Introduce every node and run until they all are voters of one metadata group."""
        self.introduce()
        everyone = set(self.nodes)
        self.run_until(lambda: all(set(h.core.raft.voters) == everyone and h.core.raft.leader is not None
                                   for h in self.nodes.values()), within_s)
        return self.leader()


def flush(h: CoreHarness) -> None:
    """After calling a room's method directly: answer local requests and apply what it emitted
    (what ``handle`` and ``on_timer`` do at the end of every call)."""
    h.core.out.drain_local(h.clock.now_s)
    h.apply(h.core.out.take())


def fire_due_timers(h: CoreHarness) -> None:
    """Run ``on_timer`` on ``h`` for as long as its core says something is due at the clock's time."""
    deadline = h.core.next_deadline()
    while deadline is not None and deadline <= h.clock.now_s:
        h.apply(h.core.on_timer(h.clock.now_s))
        deadline = h.core.next_deadline()


def advance(h: CoreHarness, seconds: float) -> list:
    """Advance ``h``'s clock, fire what is due, and return every effect (they are applied too)."""
    h.clock.now_s += seconds
    effects = []
    deadline = h.core.next_deadline()
    while deadline is not None and deadline <= h.clock.now_s:
        batch = h.core.on_timer(h.clock.now_s)
        effects.extend(batch)
        h.apply(batch)
        deadline = h.core.next_deadline()
    return effects


def steps(h: CoreHarness, seconds: float, between: Callable[[], object] | None = None, step: float = 0.1) -> None:
    """Let ``seconds`` pass on ``h`` in small steps (the heartbeat re-arms from the time it fires,
    so one long jump would run it once); ``between`` runs after each step."""
    for _ in range(round(seconds / step)):
        h.advance(step)
        if between is not None:
            between()


def sent_of(h: CoreHarness, type_: str, clear: bool = False) -> list[tuple[str, wire.Message]]:
    """(peer, message) of every request of ``type_`` that ``h`` has sent and nobody took yet."""
    found = []
    for send in h.sent:
        message = wire.decode(send.frames, h.config.cluster)
        if message.type == type_:
            found.append((send.peer, message))
    if clear:
        h.sent.clear()
    return found


def create_topic(h: CoreHarness, name: str = "t", partitions: int = 1, replication_factor: int = 1,
                 net: Net | None = None, **settings: Any) -> TopicConfig:
    """Create a topic through ``h``'s own API: answered at once by a lone storage node, else once
    ``net`` is pumped."""
    token = h.command(CreateTopic(TopicConfig(name, partitions, replication_factor, **settings)))
    if net is not None:
        net.pump()
    assert token in h.resolved, h.failed.get(token)
    return h.resolved[token]


def batch(values: list[bytes], producer_id: int = 42, base_sequence: int = 0, timestamp_ms: int = 1) -> bytes:
    """An idempotent record batch as a producer sends it."""
    return batch_format.encode_batch([(None, v, None, timestamp_ms) for v in values], producer_id=producer_id,
                                     producer_epoch=0, base_sequence=base_sequence)


def produce_body(topic: str = "t", partition: int = 0, acks: str = "leader", timeout_ms: int = 1000) -> dict:
    return {"topic": topic, "partition": partition, "acks": acks, "timeout_ms": timeout_ms}


def answers(h: CoreHarness) -> dict[int, wire.Message]:
    """The answers ``h`` gave to requests the test handed in itself (``h.request``), by request id;
    taken, so the next call sees only new ones."""
    found = {}
    for reply in h.replies:
        message = wire.decode(reply.frames, h.config.cluster)
        found[message.request_id] = message
    h.replies.clear()
    return found


def error_of(reply: wire.Message | None) -> tuple[str, str]:
    """(code, message) of an error reply (fails on anything else)."""
    assert reply is not None, "no reply"
    assert reply.type == "error", reply
    return reply.body["code"], reply.body["message"]


def member_info(node_id: str, port: int, role: str = "storage", incarnation: int = 1) -> dict:
    return {"node_id": node_id, "address": f"tcp://127.0.0.1:{port}", "pub_address": f"tcp://127.0.0.1:{port + 1}",
            "role": role, "incarnation": incarnation}


def heartbeat(info: dict, members: list[dict] | None = None, formed: bool = False, leader: str | None = None,
              size: int = 0, trivial: bool = False, can_form: bool = False, term: int = 0,
              leads: list | None = None, sender: str | None = None) -> EventReceived:
    """A heartbeat as ``info``'s node publishes it (``sender`` may differ, to forge one)."""
    body = {"member": info, "members": members if members is not None else [info], "formed": formed,
            "leader": leader, "size": size, "trivial": trivial, "can_form": can_form, "term": term,
            "leads": leads or [], "adverts": 0}
    return EventReceived(wire.Message("heartbeat", sender or info["node_id"], 0, body))


def records_of(h: CoreHarness, topic: str, partition: int) -> list[bytes]:
    state = h.core.partitions[(topic, partition)]
    data = state.log.read(state.log.start_offset, 1 << 30)
    return [r.value for r in batch_format.decode_records(data, topic, partition)]


@pytest.fixture
def lone() -> CoreHarness:
    """A storage node that formed a one-member cluster at start (no seeds, no mDNS)."""
    return CoreHarness("n1")


@pytest.fixture
def client() -> CoreHarness:
    """A client node that knows no storage node."""
    return CoreHarness("c1", role="client", data_dir=None)
