"""The client's view of the cluster: topic metadata, partition leaders, storage peers.

Theory of operation
-------------------
Any node (a client, or a storage node acting for its local API) asks a storage peer for a
topic's metadata before it produces or consumes, and keeps the answer: the topic's
configuration and each partition's leader. Waiters for the same topic share one request;
each keeps its own deadline, and a retriable failure asks again after ``METADATA_RETRY_S``
for those still in time. A caller that meets a moved leader drops the topic (``forget``)
so the next use asks afresh. A storage node that is in the cluster asks itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshq.config import TopicConfig
from meshq.core import wire
from meshq.core.room import Room
from meshq.errors import MeshqError, NodeStoppedError, TimeoutError, UnknownTopicError

METADATA_RETRY_S = 0.2


class ClientMetadata(Room):
    """Topic metadata as this node's API calls need it (see the module docstring)."""

    TIMERS = {"metadata_retry": "_retry_refresh"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.metadata: dict[str, dict] = {}  # topic -> {"config": TopicConfig, "leaders": [node_id|None]}
        self.awaiting_metadata: dict[str, list[tuple[float, Callable[[MeshqError | None], None]]]] = {}

    def forget(self, topic: str) -> None:
        """The next use of ``topic`` asks for fresh metadata (its leaders may have moved)."""
        self.metadata.pop(topic, None)

    def stop(self, error: NodeStoppedError) -> None:
        for waiters in self.awaiting_metadata.values():
            for _deadline, callback in waiters:
                callback(error)
        self.awaiting_metadata.clear()

    def storage_peers(self) -> list[str]:
        """Live storage members this node can send requests to (itself when it is in the cluster)."""
        members = self.core.mesh.members
        assert members is not None
        peers = [node for node in members.alive_ids("storage") if node in self.out.peer_endpoints]
        raft = self.core.agreement.raft
        if raft is not None and raft.is_member:
            peers.append(self.node_id)
        return sorted(peers)

    def any_storage_peer(self) -> str | None:
        peers = self.storage_peers()
        if self.node_id in peers:
            return self.node_id
        return self.core.rng.choice(peers) if peers else None

    def with_metadata(self, topic: str, now_s: float, deadline_s: float,
                      then: Callable[[MeshqError | None], None], auto_create: bool = True) -> None:
        """Run ``then(None)`` once metadata for ``topic`` is known, or ``then(error)`` at ``deadline_s``."""
        if topic in self.metadata:
            then(None)
            return
        waiters = self.awaiting_metadata.setdefault(topic, [])
        waiters.append((deadline_s, then))
        if len(waiters) == 1:
            self._refresh_metadata(topic, now_s, auto_create)

    def _retry_refresh(self, key: tuple[str, bool], now_s: float) -> None:
        """The ``metadata_retry`` timer: ask again for the waiters of a topic that are still in time."""
        topic, auto_create = key
        self._refresh_metadata(topic, now_s, auto_create)

    def _refresh_metadata(self, topic: str, now_s: float, auto_create: bool) -> None:
        """One metadata request for every waiter of ``topic``; each waiter keeps its own deadline."""
        waiters = self.awaiting_metadata.get(topic, [])
        if not waiters:
            return
        deadline_s = max(deadline for deadline, _then in waiters)

        def finish(error: MeshqError | None) -> None:
            pending = self.awaiting_metadata.pop(topic, [])
            if error is None or self.core.stopped or not error.retriable:
                for _deadline, callback in pending:
                    callback(error)
                return
            now = self.core.now_s
            alive = [(d, c) for d, c in pending if now + METADATA_RETRY_S < d]
            for deadline, callback in pending:
                if (deadline, callback) not in alive:
                    callback(error)
            if alive:
                self.awaiting_metadata[topic] = alive
                self.out.schedule(now + METADATA_RETRY_S, "metadata_retry", (topic, auto_create))

        peer = self.any_storage_peer()
        if peer is None:
            finish(TimeoutError(
                "no storage node is reachable yet: check --seed / mDNS, and that a `meshq node` is running"
            ))
            return

        def on_reply(message: wire.Message) -> None:
            self.absorb_metadata(message.body)
            if topic in self.metadata:
                finish(None)
            else:
                finish(UnknownTopicError(f"topic {topic!r} does not exist (and auto-creation is off)"))

        self.out.request(peer, "metadata", {"topics": [topic], "auto_create": auto_create}, (), now_s,
                         min(self.config.request_timeout_s, max(0.05, deadline_s - now_s)), on_reply, finish)

    def absorb_metadata(self, body: dict) -> None:
        for member in body["members"]:
            node_id = member["node_id"]
            if node_id != self.node_id and member["role"] == "storage" and member["state"] in ("alive", "suspect"):
                self.out.connect(node_id, member["address"])
        for meta in body["topics"]:
            config = TopicConfig.from_wire(meta["config"])
            self.metadata[config.name] = {
                "config": config,
                "leaders": [p["leader"] for p in meta["partitions"]],
            }

    def note_leader(self, topic: str, partition: int, leader: str) -> None:
        """A node told us who leads ``topic``/``partition`` (a ``not_leader`` hint): use it until the next
        refresh. Nothing changes when the topic's metadata is not held (the next use asks afresh anyway)."""
        meta = self.metadata.get(topic)
        if meta is not None and 0 <= partition < len(meta["leaders"]):
            meta["leaders"][partition] = leader

    def leader_of(self, topic: str, partition: int) -> str | None:
        meta = self.metadata.get(topic)
        if meta is None or partition >= len(meta["leaders"]):
            return None
        return meta["leaders"][partition]
