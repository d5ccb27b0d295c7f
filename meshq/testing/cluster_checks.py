"""Checkers for two clusters of one name that meet (``SimOptions.apart``; ``meshq.core.cluster``): they stay
apart (``ClustersApartChecker``), or one gives itself up only while it holds nothing (``MergeLosesNothingChecker``)."""

from __future__ import annotations

from typing import Any

from meshq.testing.checks import Violation


class ClustersApartChecker:
    """Two formed clusters of the same name that meet stay apart (``Formation.foreign``): given the cluster each
    storage node was formed in (``formation_of``: node id -> formation, taken before they meet), after every
    event no node's metadata voters or learners, and no partition's replicas or learners on any node, name a
    node of another formation; and every copy of a partition holds only records of its own cluster (its
    committed prefix is a prefix of what a node of its own formation holds). Mixing two logs of one partition
    starts with one of these."""

    def __init__(self, formation_of: dict[str, str]) -> None:
        self.formation_of = dict(formation_of)
        self.checks = 0

    def check(self, node_id: str, core: Any) -> None:
        self.checks += 1
        ours = self.formation_of.get(node_id)
        raft = core.agreement.raft
        if ours is None or raft is None:
            return
        if raft.formed and raft.formation != ours and raft.is_member:
            raise Violation(f"{node_id} (formed in {ours}) now follows the metadata log of formation "
                            f"{raft.formation}")
        for who in (*raft.voters, *raft.learners):
            theirs = self.formation_of.get(who)
            if theirs is not None and theirs != ours:
                raise Violation(f"{node_id} (formation {ours}) has {who} (formation {theirs}) in its metadata "
                                f"group: voters {sorted(raft.voters)}, learners {sorted(raft.learners)}")
        for (topic, partition), state in sorted(core.partitions.items()):
            replica = state.replica
            for who in (*replica.replicas, *replica.learners):
                theirs = self.formation_of.get(who)
                if theirs is not None and theirs != ours:
                    raise Violation(f"{node_id} (formation {ours}): {topic}/{partition} names {who} (formation "
                                    f"{theirs}) as a replica: replicas {replica.replicas}, learners "
                                    f"{replica.learners}")



class MergeLosesNothingChecker:
    """A cluster gives itself up to another of the same name only while it holds nothing
    (``Formation._maybe_merge``, metadata ``dissolve``): after every event, no storage node that held a topic,
    grant or rebuild in its metadata (applied, or any committed entry but membership changes) at its previous
    check has left that formation since (its log reset or now of another formation). Each node is checked
    against what it held just before, so a node that gave up a group holding something is caught at the step
    it did."""

    def __init__(self) -> None:
        self.before: dict[str, tuple[str, bool]] = {}  # node id -> (formation, held something)
        self.checks = 0
        self.given_up: list[tuple[str, str]] = []  # (node, formation) each time a node was seen to leave one

    def check(self, node_id: str, core: Any) -> None:
        self.checks += 1
        raft = core.agreement.raft
        if raft is None:
            return
        formation = raft.formation
        # applied metadata (read here, not through the rule's own holds_nothing), and any committed entry that is
        # not membership (one committed after a dissolve, which the applied state ignores, included)
        meta = core.agreement.meta
        first = raft.first_content_index
        held = bool(meta.topics or meta.rebuilds or meta.acl.count) or (first is not None and first <= raft.commit_index)
        previous = self.before.get(node_id)
        self.before[node_id] = (formation, held)
        if previous is None or not previous[0] or previous[0] == formation:
            return
        self.given_up.append((node_id, previous[0]))
        if previous[1]:
            raise Violation(f"{node_id} gave up formation {previous[0]} (now {formation or 'none'}) while its "
                            f"metadata held something: topics, grants or rebuilds are lost")


__all__ = ["ClustersApartChecker", "MergeLosesNothingChecker"]
