"""Status: one node's view of the cluster, and the merge of several into the cluster's.

Theory of operation
-------------------
Every storage node answers ``status`` with its local view (``local_status``): members, the
agreed metadata and ring, each partition's replica set with this node's replica state, group
offsets with lag, and counters. Only a partition's leader knows its in-sync replicas and
committed high watermark, and nodes apply metadata at different times, so a client asks every
live storage node and merges (``merge_status``): members and metadata from one node, each
partition as its leader sees it, replica sets from the newest configuration. The shape is
``meshq status --json`` (docs/cli.md).
"""

from __future__ import annotations

from typing import Any

from meshq.core import wire
from meshq.core.room import Room


class Status(Room):
    """This node's view in the shape of ``meshq status --json``."""

    SERVES = {"status": "serve_status"}

    def serve_status(self, route: Any, message: wire.Message, now_s: float) -> None:
        self.out.reply(route, message.request_id, "status_ok", {"status": self.local_status()})

    def handoffs(self) -> int:
        """Partitions not yet where the ring places them (copies being made or replicas leaving)."""
        meta = self.core.agreement.meta
        if not len(meta.ring):
            return 0
        return sum(1 for topic, assignment in meta.assignments.items() for p, replicas in enumerate(assignment)
                   if meta.learners[topic][p] or replicas != meta.target(topic, p))

    def local_status(self) -> dict:
        """This node's view in the shape of ``meshq status --json``."""
        core = self.core
        catalog = core.catalog
        topics = []
        for name, config in sorted(core.agreement.meta.topics.items()):
            meta = catalog.topic_meta(config)
            topics.append({"name": name, "config": meta["config"], "partitions": meta["partitions"]})
        rpc = core.rpc.report()
        status = {
            "cluster": self.config.cluster,
            "node_id": self.node_id,
            "members": catalog.member_list(),
            "topics": topics,
            "groups": core.groups.lag_report() + core.shared.report(),
            "counters": dict(core.counters),
            "invalid_frames": core.invalid_frames(),
            "pubsub": {"nodes": [core.pubsub.report()]},
            "services": rpc["services"],
            "service_instances": rpc["instances"],
            "access": core.access.report(),
        }
        if core.is_storage:
            status.update(core.space.report())  # storage_full, storage_full_reason
            throttle = core.host.copy_throttle
            status["copy"] = {"rate_mb_per_s": self.config.copy_rate_mb_per_s, "bytes_sent": throttle.bytes_sent,
                              "waits": throttle.waits, "yielding_to_writes": throttle.yielding(core.now_s),
                              "rate_now_mb_per_s": round(throttle.rate_now(core.now_s) / 1_000_000, 3)}
            # round trips to the peers its replicas talk to, and which of them counts as slow (partitions.latency)
            status["peer_rtt"] = core.host.latency.status(core.now_s)
        raft = core.agreement.raft
        if raft is not None:
            meta = core.agreement.meta
            status["metadata"] = {**raft.status(), "applied_index": meta.applied_index}
            status["ring"] = {"members": list(meta.ring.members), "vnodes": meta.ring.vnodes}
        return status


def merge_status(reports: dict[str, dict], preferred: str) -> dict:
    """One cluster status from the local views of several storage nodes.

    Members and metadata come from ``preferred``; each partition's high watermark and in-sync
    set from the node that leads it (``in_sync`` is None, unknown, when no report of its leader
    is in the merge: a follower's view would wrongly show it empty); consumer groups from the
    node that stores them.
    """
    merged = dict(reports[preferred])
    # Each partition as its leader sees it (the highest epoch wins if two still claim it).
    leader_views: dict[tuple[str, int], dict] = {}
    for node_id in sorted(reports):
        for topic in reports[node_id]["topics"]:
            for p in topic["partitions"]:
                if p["leader"] == node_id and p.get("role", "leader") == "leader":
                    key = (topic["name"], p["partition"])
                    known = leader_views.get(key)
                    if known is None or p.get("epoch", 0) > known.get("epoch", 0):
                        leader_views[key] = p
    by_leader = {key: p["high_watermark"] for key, p in leader_views.items()}
    # The replica set as the most up-to-date metadata has it (nodes apply changes at different times).
    configs: dict[tuple[str, int], dict] = {}
    for node_id in sorted(reports):
        for topic in reports[node_id]["topics"]:
            for p in topic["partitions"]:
                key = (topic["name"], p["partition"])
                if key not in configs or p.get("config_version", 0) > configs[key].get("config_version", 0):
                    configs[key] = p
    # Offsets damaged on each replica that reported; lost for the cluster only where every one is.
    damaged: dict[tuple[str, int], dict[str, list]] = {}
    corrupt: dict[tuple[str, int], dict[str, tuple[int, int]]] = {}  # (detected, repaired) per replica
    for node_id in sorted(reports):
        for topic in reports[node_id]["topics"]:
            for p in topic["partitions"]:
                if "lost_offsets" in p:
                    damaged.setdefault((topic["name"], p["partition"]), {})[node_id] = p["lost_offsets"]
                if "corrupt_batches_detected" in p:
                    corrupt.setdefault((topic["name"], p["partition"]), {})[node_id] = (
                        p["corrupt_batches_detected"], p.get("corrupt_batches_repaired", 0))
    topics = []
    for topic in merged["topics"]:
        partitions = []
        for p in topic["partitions"]:
            view = leader_views.get((topic["name"], p["partition"]))
            newest = configs.get((topic["name"], p["partition"]), p)
            p = {**p, **{k: newest[k] for k in ("replicas", "learners", "target", "config_version") if k in newest}}
            if view is None:  # its leader did not answer: the in-sync set is unknown (null), not empty
                partitions.append({**p, "in_sync": p["in_sync"] if p.get("role") == "leader" else None})
            else:
                partitions.append({**p, **{k: view[k] for k in ("leader", "in_sync", "high_watermark", "epoch")
                                           if k in view}})
        for p in partitions:
            per_node = damaged.get((topic["name"], p["partition"]))
            if per_node is not None:
                p["damaged_offsets"] = {node: ranges for node, ranges in per_node.items() if ranges}
                p["lost_offsets"] = _common_ranges(list(per_node.values()))
            counts = corrupt.get((topic["name"], p["partition"]))
            if counts is not None:  # summed over the replicas that reported
                p["corrupt_batches_detected"] = sum(detected for detected, _ in counts.values())
                p["corrupt_batches_repaired"] = sum(repaired for _, repaired in counts.values())
        topics.append({**topic, "partitions": partitions})
    merged["topics"] = topics
    merged["handoffs"] = sum(1 for topic in topics for p in topic["partitions"]
                             if p.get("learners") or p.get("target", p["replicas"]) != p["replicas"])
    groups: dict[tuple[str, str, int], dict] = {}
    # A group's members, generation and state as its coordinator sees them: only the node that
    # coordinates it knows them; if two claim to (a failover under way), the higher generation wins.
    membership: dict[str, dict] = {}
    for node_id in sorted(reports):
        for group in reports[node_id]["groups"]:
            known = membership.get(group["group"])
            if "generation" in group and (known is None or (group.get("state") != "empty", group["generation"])
                                          > (known.get("state") != "empty", known["generation"])):
                membership[group["group"]] = {k: group[k] for k in ("mode", "generation", "state", "members")
                                              if k in group}
            for p in group["partitions"]:
                hw = by_leader.get((p["topic"], p["partition"]), p["high_watermark"])
                groups[(group["group"], p["topic"], p["partition"])] = {
                    **p, "high_watermark": hw, "lag": max(0, hw - p["committed"])}
    merged_groups: dict[str, dict] = {name: {"group": name, **membership[name], "partitions": []}
                                      for name in sorted(membership)}
    for (group, _topic, _partition), entry in sorted(groups.items()):
        merged_groups.setdefault(group, {"group": group, "partitions": []})["partitions"].append(entry)
    for node_id in sorted(reports):  # a shared group: its mode and the members its leaders saw
        for group in reports[node_id]["groups"]:
            entry = merged_groups.get(group["group"])
            if group.get("mode") == "shared" and entry is not None and "generation" not in entry:
                entry["mode"] = "shared"
                entry["members"] = sorted(set(entry.get("members", [])) | set(group.get("members", [])))
    merged["groups"] = [merged_groups[name] for name in sorted(merged_groups)]
    merged["pubsub"] = merge_pubsub(reports.values())
    # services offered by each node that answered (a node's own counts are only known to it)
    merged["services"] = [s for node_id in sorted(reports) for s in reports[node_id].get("services", [])]
    # the live instances of each service, as any node that answered sees them (adverts: a client process
    # that serves is known to the nodes before a freshly started asker has heard of it)
    merged["service_instances"] = merge_instances(report.get("service_instances", {}) for report in reports.values())
    # frames each node dropped as invalid, with the peers that sent them (a node's own count)
    merged["invalid_frames"] = {node_id: reports[node_id]["invalid_frames"] for node_id in sorted(reports)
                                if "invalid_frames" in reports[node_id]}
    # each node's round trips to its peers (``partitions.latency``): a slow node stands out in every other row
    merged["peer_rtt"] = {node_id: reports[node_id]["peer_rtt"] for node_id in sorted(reports)
                          if "peer_rtt" in reports[node_id]}
    merged["answered_by"] = sorted(reports)
    # Each storage node says whether its storage is full; a member that did not answer: unknown (None).
    merged["members"] = [
        {**member, "storage_full": reports[member["node_id"]].get("storage_full")
         if member["node_id"] in reports else None} if member.get("role") == "storage" else member
        for member in merged.get("members", [])]
    return merged


def merge_instances(views: Any) -> dict[str, list[str]]:
    """Several ``{service: [node ids]}`` views as one: each service's node ids in any of them, sorted."""
    merged: dict[str, set[str]] = {}
    for view in views:
        for name, ids in view.items():
            merged.setdefault(name, set()).update(ids)
    return {name: sorted(ids) for name, ids in sorted(merged.items())}


def merge_pubsub(reports: Any) -> dict:
    """The ``pubsub`` sections of several status reports: each node's subscriptions once, by node id."""
    nodes: dict[str, dict] = {}
    for report in reports:
        for node in report.get("pubsub", {}).get("nodes", []):
            nodes[node["node_id"]] = node
    return {"nodes": [nodes[node_id] for node_id in sorted(nodes)]}


def _common_ranges(per_replica: list[list]) -> list[list[int]]:
    """The ``[first, last]`` offset ranges present in every one of ``per_replica``'s range lists."""
    common = [list(r) for r in per_replica[0]] if per_replica else []
    for ranges in per_replica[1:]:
        common = [[max(a[0], b[0]), min(a[1], b[1])] for a in common for b in ranges
                  if max(a[0], b[0]) <= min(a[1], b[1])]
    return common
