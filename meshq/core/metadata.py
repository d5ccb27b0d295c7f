"""The cluster metadata: the state machine the metadata Raft log is applied to.

Every storage node applies the same committed commands in the same order, so every node
holds the same agreed storage membership, topic configurations and partition
assignments. Commands (msgpack maps):

* ``{"op": "config", "members": {node_id: member_info}}`` — the full storage membership.
* ``{"op": "create_topic", "config": {...}, "assignment": [[node_id, ...], ...]}`` — a topic and,
  per partition, its replica list (the first is the preferred leader). The proposer
  computes the assignment from the ring over the committed membership; applying is
  idempotent (an existing topic is left unchanged).
* ``{"op": "noop"}`` — appended by each new Raft leader.
"""

from __future__ import annotations

from meshq.config import TopicConfig
from meshq.core.ring import HashRing

INTERNAL_TOPICS = frozenset({"__consumer_offsets"})


class MetadataState:
    """Applied metadata; see the module docstring."""

    def __init__(self) -> None:
        self.applied_index = -1
        self.members: dict[str, dict] = {}
        self.topics: dict[str, TopicConfig] = {}
        self.assignments: dict[str, list[list[str]]] = {}
        self.ring = HashRing(())

    def apply(self, index: int, command: dict) -> str | None:
        """Apply one committed command; returns the name of a created topic, if any."""
        assert index == self.applied_index + 1, f"metadata applied out of order: {index} after {self.applied_index}"
        self.applied_index = index
        op = command.get("op")
        if op == "config":
            self.members = {node: dict(info) for node, info in command["members"].items()}
            self.ring = HashRing(self.members)
        elif op == "create_topic":
            config = TopicConfig.from_wire(command["config"])
            if config.name.startswith("__") and config.name not in INTERNAL_TOPICS:
                return None  # reserved; proposers refuse it too, so this is only defence in depth
            if config.name not in self.topics:
                assert len(command["assignment"]) == config.partitions
                self.topics[config.name] = config
                self.assignments[config.name] = [list(replicas) for replicas in command["assignment"]]
                return config.name
        return None

    def assign(self, config: TopicConfig) -> list[list[str]]:
        """Replica lists for a new topic from the ring over the committed membership."""
        copies = min(config.replication_factor, len(self.members))
        return self.ring.placement(config.name, config.partitions, copies)

    def replicas(self, topic: str, partition: int) -> list[str]:
        assignment = self.assignments.get(topic)
        if assignment is None or partition >= len(assignment):
            return []
        return assignment[partition]

    def leader(self, topic: str, partition: int) -> str | None:
        replicas = self.replicas(topic, partition)
        return replicas[0] if replicas else None
