"""The catalog: which topics exist, with what configuration, and where their partitions are.

Theory of operation
-------------------
Topic configurations and replica sets live in the agreed metadata (``core.agreement``); this
room answers questions about them and asks for new ones. ``metadata`` returns the members and
each requested topic's partitions with their current leader (our own replica's view, else the
heartbeats' hints), creating a missing topic first when auto-creation is on (and always the
internal ``__consumer_offsets``); ``create_topic`` proposes one. Names starting with ``__``
are meshq's own. Storage nodes only: a client holds no metadata to serve.
"""

from __future__ import annotations

from typing import Any

from meshq.config import TopicConfig, refuse_reserved_topic, validate_topic_name
from meshq.core import wire
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.metadata import MetadataState
from meshq.core.room import Room
from meshq.errors import InvalidTopicError, MeshqError, NotLeaderError


class Catalog(Room):
    """Topic metadata: served, created, described (see the module docstring)."""

    SERVES = {"metadata": "serve_metadata", "create_topic": "serve_create_topic"}

    @property
    def meta(self) -> MetadataState:
        return self.core.agreement.meta

    def serve_metadata(self, route: Any, message: wire.Message, now_s: float) -> None:
        self.require_storage()
        names = message.body["topics"]
        if names is None:
            names = sorted(name for name in self.meta.topics if not name.startswith("__"))
        missing = [name for name in names if name not in self.meta.topics
                   and (name == OFFSETS_TOPIC or (message.body["auto_create"] and self.config.auto_create_topics))]
        if missing:
            for name in missing:  # auto-creation creates topics: the caller needs admin on each, checked before any
                if name != OFFSETS_TOPIC:  # (the next ones are created in a callback, with no caller set)
                    self.core.access.check("admin", name)
            name = missing[0]
            config = self.offsets_topic_config() if name == OFFSETS_TOPIC else self._default_topic_config(name)

            def created(error: MeshqError | None) -> None:
                if error is not None:
                    self.out.reply_error(route, message.request_id, error)
                else:
                    self.serve_metadata(route, message, self.core.now_s)

            self.core.agreement.propose({"op": "create_topic", "config": config.to_wire()}, now_s,
                                        now_s + self.config.request_timeout_s, created)
            return
        topics = [self.topic_meta(self.meta.topics[name]) for name in names if name in self.meta.topics]
        self.out.reply(route, message.request_id, "metadata_ok", {"members": self.member_list(), "topics": topics})

    def serve_create_topic(self, route: Any, message: wire.Message, now_s: float) -> None:
        self.require_storage()
        config = TopicConfig.from_wire(message.body["config"])
        refuse_reserved_topic(config.name)
        self.core.access.check("admin", config.name)
        existing = self.meta.topics.get(config.name)
        if existing is not None:
            if not message.body["if_not_exists"]:
                raise InvalidTopicError(f"topic {config.name!r} already exists")
            self.out.reply(route, message.request_id, "create_topic_ok",
                           {"topic": self.topic_meta(existing), "created": False})
            return

        def created(error: MeshqError | None) -> None:
            if error is not None:
                self.out.reply_error(route, message.request_id, error)
                return
            self.out.reply(route, message.request_id, "create_topic_ok",
                           {"topic": self.topic_meta(self.meta.topics[config.name]), "created": True})

        self.core.agreement.propose({"op": "create_topic", "config": config.to_wire()}, now_s,
                                    now_s + self.config.request_timeout_s, created)

    def require_storage(self) -> None:
        if not self.core.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and holds no partitions")

    def _default_topic_config(self, name: str) -> TopicConfig:
        validate_topic_name(name)
        refuse_reserved_topic(name)
        return TopicConfig(name=name, partitions=self.config.partitions,
                           replication_factor=self.config.replication_factor)

    def offsets_topic_config(self) -> TopicConfig:
        return TopicConfig(name=OFFSETS_TOPIC, partitions=self.config.partitions,
                           replication_factor=self.config.replication_factor, retention_ms=None,
                           cleanup_policy="compact")

    def member_list(self) -> list[dict]:
        """Known nodes with their state; agreed storage members we never heard from show as unknown."""
        assert self.core.mesh.members is not None
        listed = {m["node_id"]: m for m in self.core.mesh.members.summaries()}
        for node_id, info in self.meta.members.items():
            if node_id not in listed:
                listed[node_id] = {"node_id": node_id, "address": info["address"], "role": "storage",
                                   "state": "unknown"}
        return [listed[node_id] for node_id in sorted(listed)]

    def topic_meta(self, config: TopicConfig) -> dict:
        partitions = []
        for p, replicas in enumerate(self.meta.assignments.get(config.name, [])):
            state = self.core.host.get((config.name, p))
            replica = state.replica if state is not None else None
            _voters, learners, version = self.meta.partition_config(config.name, p)
            entry = {
                "partition": p,
                "leader": self.core.host.current_leader(config.name, p),
                "replicas": list(replicas),
                "in_sync": [],
                "high_watermark": replica.high_watermark if replica is not None else 0,
                # rebalancing: where the ring places it now; learners are copies being made
                "learners": list(learners),
                "target": self.meta.target(config.name, p) if len(self.meta.ring) else list(replicas),
                "config_version": version,
            }
            rebuild = self.meta.rebuilds.get((config.name, p))
            if rebuild is not None:
                # every replica was removed for good once: recreated empty from ``start_offset``
                # (lost_offsets: held by the removed replicas; unknown_offsets: lost if they were handed
                # out after the last report of the log end reached the metadata leader)
                first, end, start = rebuild["first"], rebuild["end"], rebuild["start"]
                known_end = first if end is None else end
                entry["rebuilt"] = {"epoch": rebuild["epoch"], "start_offset": start, "reported_end": end,
                                    "lost_offsets": [[first, end - 1]] if end is not None and end > first else [],
                                    "unknown_offsets": [[known_end, start - 1]]}
            if replica is not None:
                # Only the leader knows who is in sync; merge_status prefers the leader's view.
                entry["in_sync"] = replica.in_sync(self.core.now_s)
                entry["epoch"] = replica.epoch
                entry["role"] = replica.role
                entry["end_offset"] = replica.log.end_offset
                # offsets damaged on this node's disk, never served (merge_status: lost where no copy has them)
                entry["lost_offsets"] = [list(lost) for lost in replica.log.lost_offsets]
                # damaged batches this node's log found (recovery, reads, scrub) and wrote back from a peer
                entry["corrupt_batches_detected"] = replica.log.corrupt_batches_detected
                entry["corrupt_batches_repaired"] = replica.log.corrupt_batches_repaired
            partitions.append(entry)
        return {"config": config.to_wire(), "partitions": partitions}
