"""The simulated network: every message between nodes goes through here.

Theory of operation
-------------------
Each ``Send``/``Reply``/``Publish`` effect arrives as the frames the core encoded. The network
finds the target — the node behind the endpoint the sender connected to, the requester of a
reply, every node subscribed to the sender's publish endpoint, in node order — and queues a
``deliver`` event for it after a latency drawn from ``FaultOptions.latency_s``, so messages
overtake one another. While the run is in its fault phase a message may be dropped
(``drop``), delivered twice (``duplicate``) or damaged (``corrupt``: a header cut short or
random, a bit flipped in a record batch — what a broken or hostile peer could send). On delivery the frames are decoded with the
real wire decoder into the event the target's core expects; a frame it rejects is reported
to that core as invalid, as the real transport does.

Pub/sub data (``send_data``) travels on a channel of its own that behaves as ZeroMQ over TCP:
only to a node whose SUB is connected to the sender's PUB, in order on each link (a message
never overtakes an earlier one on the same link) and never twice; it may be lost (``drop``,
a cut). ``meshq.testing.sim.pubsub`` takes it on arrival.

A calling thread of a client (``meshq.testing.sim.threads``) has connections of its own, as a
thread's DEALER socket has in the real node: ``open`` names one by a key and the thread that
reads it; ``send_on`` sends a request from the client node on it, and the leader's reply,
routed back by that key, goes to the thread instead of the client's core.

With ``SimOptions.apart`` no message crosses between its two groups until they meet (``apart``).

Partitions cut links in both directions, between one side and every other node (clients
included): ``partition``, then perhaps ``bridge`` to let one cut link through (a
non-transitive partition), until ``heal``. A cut link drops what is sent over it and what
was already in flight when it was cut. With ``FaultOptions.disconnect_s`` a link cut that long
also drops its connections: both ends get ``PeerDisconnected`` (``disconnect``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.events import EventReceived, PeerDisconnected, ReplyReceived, RequestReceived
from meshq.errors import CorruptLogError, ProtocolError
from meshq.testing.sim.options import CLUSTER

if TYPE_CHECKING:
    from meshq.testing.sim.node import SimNode
    from meshq.testing.sim.simulation import Simulation


class Network:
    """The links between the simulation's nodes: routing, latency, loss, duplication and cuts."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self._by_endpoint: dict[str, str] = {}  # endpoint -> node id
        self._cut: set[frozenset[str]] = set()  # links that carry nothing, both ways
        self._cuts = 0  # partitions made so far: a cut link remembers which one cut it (``disconnect``)
        self._cut_by: dict[frozenset[str], int] = {}
        self._readers: dict[str, Callable[[str, wire.Message], None]] = {}  # own connection key -> its reader
        self._data_due: dict[tuple[str, str], float] = {}  # (source, target) -> when its last data arrives

    def attach(self, node: SimNode) -> None:
        """Make the node reachable at its request and publish endpoints."""
        self._by_endpoint[node.endpoint] = node.node_id
        self._by_endpoint[node.pub_endpoint] = node.node_id

    def open(self, key: str, reader: Callable[[str, wire.Message], None]) -> None:
        """A connection of a client's own (a calling thread's): replies routed back by ``key`` go to
        ``reader(source, message)``."""
        self._readers[key] = reader

    # ------------------------------------------------------------------ what cores send
    def send(self, node: SimNode, peer: str, frames: list) -> None:
        """A request over the node's connection to ``peer`` (none open: nothing is sent)."""
        endpoint = node.connections.get(peer)
        if endpoint is not None:
            self._transmit(node.node_id, self._by_endpoint.get(endpoint), ("request", peer), frames)

    def send_on(self, node: SimNode, key: str, endpoint: str, frames: list) -> None:
        """A request from the node over its own connection ``key`` to ``endpoint``."""
        self._transmit(node.node_id, self._by_endpoint.get(endpoint), ("request", key), frames)

    def node_at(self, endpoint: str) -> str | None:
        """The node behind an endpoint."""
        return self._by_endpoint.get(endpoint)

    def reply(self, node: SimNode, route: tuple[str, Any], frames: list) -> None:
        """A reply to the node that sent the request ``route`` names."""
        requester, peer_key = route
        self._transmit(node.node_id, requester, ("reply", peer_key), frames)

    def publish(self, node: SimNode, frames: list) -> None:
        """An event to every other node subscribed to the node's publish endpoint."""
        for other in sorted(self.sim.nodes.values(), key=lambda n: n.node_id):
            if node.pub_endpoint in other.subscriptions and other.node_id != node.node_id:
                self._transmit(node.node_id, other.node_id, ("event", None), frames)

    def send_data(self, node: SimNode, target: str, frames: list) -> None:
        """A pub/sub batch to ``target``, if its SUB is connected to the node's PUB (see the module docstring)."""
        sim = self.sim
        other = sim.nodes.get(target)
        if other is None or node.pub_endpoint not in other.subscriptions:
            return
        if (frozenset((node.node_id, target)) in self._cut or self.apart(node.node_id, target)
                or (sim.faulting and sim.rng.random() < sim.options.faults.drop)):
            sim.stats["dropped"] += 1
            return
        link = (node.node_id, target)
        when = max(sim.now_s + sim.rng.uniform(*sim.options.faults.latency_s) + self._slowness(node.node_id, target),
                   self._data_due.get(link, 0.0))
        self._data_due[link] = when
        sim.at(when, "deliver", (node.node_id, target, ("data", None), list(frames)))

    def _transmit(self, source: str, target_endpoint_or_id: str | None, channel: tuple, frames: list) -> None:
        sim = self.sim
        if target_endpoint_or_id is None:
            return
        target = self._by_endpoint.get(target_endpoint_or_id, target_endpoint_or_id)
        if target not in sim.nodes:
            return
        faults = sim.options.faults
        if frozenset((source, target)) in self._cut or self.apart(source, target):
            sim.stats["dropped"] += 1
            return
        if sim.faulting and sim.rng.random() < faults.drop:
            sim.stats["dropped"] += 1
            return
        copies = 2 if sim.faulting and sim.rng.random() < faults.duplicate else 1
        sim.stats["duplicated"] += copies - 1
        if faults.corrupt and sim.faulting and sim.rng.random() < faults.corrupt:
            frames = self._corrupted(frames)
            sim.stats["corrupted"] = sim.stats.get("corrupted", 0) + 1
        for _ in range(copies):
            latency = sim.rng.uniform(*faults.latency_s) + self._slowness(source, target)
            sim.at(sim.now_s + latency, "deliver", (source, target, channel, list(frames)))

    def apart(self, source: str, target: str) -> bool:
        """The two groups of ``SimOptions.apart`` cannot reach each other yet and these are one of each."""
        apart = self.sim.options.apart
        if apart is None or self.sim.now_s >= apart[1]:
            return False
        group = self.sim.options.apart_ids
        return (source in group) != (target in group)

    def _slowness(self, source: str, target: str) -> float:
        """The extra delay of a message between ``source`` and ``target`` (``SimOptions.slow``)."""
        slow = self.sim.options.slow
        if slow is None or (source != slow[0] and target != slow[0]) or not slow[1] <= self.sim.now_s < slow[2]:
            return 0.0
        return slow[3]

    def _corrupted(self, frames: list) -> list:
        """``frames`` damaged as a hostile or broken peer could send them, in a way a receiver can
        detect (the ``corrupt`` fault): the header cut short or replaced by random bytes, or one
        bit flipped in a record batch (its CRC covers it). A change that leaves a frame well-formed
        (a flipped bit inside a header's values) is not detectable without integrity protection of
        the transport (CurveZMQ), so it is not simulated."""
        rng = self.sim.rng
        frames = [bytes(f) for f in frames]
        try:
            type_ = wire.decode(frames, CLUSTER).type
        except ProtocolError:
            type_ = ""
        spans = []  # (frame, start, end) of the bytes each batch's CRC covers
        if type_ in ("produce", "repl_append", "fetch_ok"):
            for i in range(1, len(frames)):
                try:
                    spans += [(i, pos + 21, pos + header.size)
                              for pos, header in batch_format.iter_batches(frames[i], verify_crc=False)]
                except CorruptLogError:
                    pass
        if spans and rng.random() < 0.5:
            # (the base offset, length and leader epoch precede the CRC'd bytes: a flip there is not
            # detectable by the format; the transport's checksums are what protect them)
            i, start, end = rng.choice(spans)
            j = rng.randrange(start, end)
            frames[i] = frames[i][:j] + bytes([frames[i][j] ^ (1 << rng.randrange(8))]) + frames[i][j + 1:]
        elif rng.random() < 0.5:
            frames[0] = frames[0][:rng.randrange(len(frames[0]))]
        else:
            frames[0] = rng.randbytes(rng.randrange(64))
        return frames

    # ------------------------------------------------------------------ arrival
    def deliver(self, source: str, target: str, channel: tuple, frames: list) -> None:
        """A ``deliver`` event: decode the frames and hand them to the target's core, if it is up."""
        sim = self.sim
        node = sim.nodes[target]
        if node.core is None:
            return
        if frozenset((source, target)) in self._cut or self.apart(source, target):
            sim.stats["dropped"] += 1
            return
        if channel[0] == "data":
            sim.stats["delivered"] += 1
            if sim.record_trace:
                sim.log(f"{source}->{target} pubsub data")
            sim.take_data(node, frames)
            return
        reader = self._readers.get(channel[1]) if channel[0] == "reply" else None
        try:
            message = wire.decode(frames, CLUSTER)
        except ProtocolError as exc:
            if reader is None:  # (a thread's own connection drops it, as its shell does)
                node.core.note_invalid_frame(exc)
            return
        sim.stats["delivered"] += 1
        if sim.record_trace:
            sim.log(f"{source}->{target} {message.type} #{message.request_id}")
        if reader is not None:
            reader(source, message)
        elif channel[0] == "request":
            sim.feed(node, RequestReceived((source, channel[1]), message))
        elif channel[0] == "reply":
            sim.feed(node, ReplyReceived(channel[1], message))
        else:
            sim.feed(node, EventReceived(message))

    # ------------------------------------------------------------------ partitions
    @property
    def partitioned(self) -> bool:
        """Some link is cut."""
        return bool(self._cut)

    def partition(self, side: set[str]) -> None:
        """Cut every link between a node in ``side`` and a node outside it."""
        everyone = sorted(self.sim.nodes)
        self._cuts += 1
        after_s = self.sim.options.faults.disconnect_s
        for a in everyone:
            for b in everyone:
                if a < b and ((a in side) != (b in side)):
                    link = frozenset((a, b))
                    if link not in self._cut and after_s:
                        self._cut_by[link] = self._cuts
                        self.sim.at(self.sim.now_s + after_s, "disconnect", (a, b, self._cuts))
                    self._cut.add(link)

    def disconnect(self, a: str, b: str, cut: int) -> None:
        """The ``disconnect`` event: the link between ``a`` and ``b`` has been cut (by partition ``cut``, without a
        heal since) for ``FaultOptions.disconnect_s``: their connections to each other drop, and each end is told
        ``PeerDisconnected``, as the runtime's drop monitor tells its core."""
        link = frozenset((a, b))
        if link not in self._cut or self._cut_by.get(link) != cut:
            return
        for node_id, peer in ((a, b), (b, a)):
            self.sim.stats["disconnects"] = self.sim.stats.get("disconnects", 0) + 1
            if self.sim.record_trace:
                self.sim.log(f"{node_id}: connection to {peer} dropped")
            self.sim.feed(self.sim.nodes[node_id], PeerDisconnected(peer))

    def bridge(self, a: str, b: str) -> None:
        """Let the cut link between ``a`` and ``b`` carry messages again."""
        self._cut.discard(frozenset((a, b)))
        self._cut_by.pop(frozenset((a, b)), None)

    def heal(self) -> None:
        """Every link carries messages again."""
        self._cut.clear()
        self._cut_by.clear()
