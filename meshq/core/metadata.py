"""The cluster metadata: the state machine the metadata Raft log is applied to.

Every storage node applies the same committed commands in the same order, so every node
holds the same agreed storage membership, topic configurations and partition
assignments. Commands (msgpack maps):

* ``{"op": "config", "members": {node_id: member_info}}`` — the full storage membership. A
  member whose info carries ``"leaving": true`` (it ran ``meshq leave``) stays a metadata
  voter but leaves the placement ring, so its partitions move away; once none is assigned
  to it, the metadata leader removes it for good.
* ``{"op": "create_topic", "config": {...}, "assignment": [[node_id, ...], ...]}`` — a topic and,
  per partition, its replica list (the first is the preferred leader). The proposer
  computes the assignment from the ring over the committed membership; applying is
  idempotent (an existing topic is left unchanged).
* ``{"op": "reassign", "topic", "partition", "version", "replicas", "learners"}`` — one step
  of moving a partition towards its ring placement (``docs/architecture.md``, Rebalancing):
  applied only if ``version`` is the partition's current configuration version (a
  compare-and-set, so a stale or repeated proposal is a no-op), the voter *set* differs from
  the current one by at most one member, every added node is a member, and learners are
  members outside the voters. Each applied step bumps the version.
* ``{"op": "acl", "action": "grant"|"revoke", "name", "permission", "pattern"}`` — a client key's
  permission (``meshq.core.acl``): applied in log order, so every node holds the same grants; a
  repeated grant, a revoke of nothing and a malformed command change nothing.
* ``{"op": "rebuild", "topic", "partition", "version", "replicas", "epoch", "first", "end", "start"}``
  — a partition none of whose voters is a member any more (every replica was removed for
  good: no copy is left) is recreated empty on ``replicas`` (its ring placement). Applied only
  if ``version`` is the current configuration version and still no voter is a member; it
  replaces voters and learners at once (no one-step rule: there is no old majority to
  overlap) and bumps the version. ``first`` is where the lost log started counting (an
  earlier rebuild's start, else 0); ``end`` the highest log end offset a leader of the
  partition reported in its heartbeats (None: none was ever heard from); ``start``, where the
  new log starts, lies past ``end`` by ``REBUILD_GAP`` or twice the largest growth seen
  between two reports, whichever is more: offsets the leader may have handed out after its
  last report reached the metadata leader are never handed out again. Offsets
  ``first..end-1`` are lost; ``end..start-1`` are lost if they were handed out at all.
  ``epoch`` lies ``REBUILD_EPOCH_GAP`` above every leader epoch heard of (and above the previous
  rebuild's), so the rebuilt replica's elections land above any epoch an old copy may reach —
  including one its removed node goes on electing itself in after its last report, when it
  comes back. ``docs/guarantees.md`` states the window.
* ``{"op": "noop"}`` — appended by each new Raft leader.
* ``{"op": "dissolve", "into": formation}`` — this cluster holds nothing (no topic, no grant, no
  rebuild) and gives itself up to join the cluster of the same name ``into``
  (``meshq.core.cluster.formation``, docs/operations.md "Two clusters of the same name"). Applied
  only while the state still holds nothing: it sets ``dissolved``, and every later command is
  ignored (no leader proposes one once a dissolve is in its log); each node then forgets this
  metadata group and asks to join ``into``.
"""

from __future__ import annotations

from meshq.config import TopicConfig
from meshq.core.acl import Acl
from meshq.core.ring import HashRing

INTERNAL_TOPICS = frozenset({"__consumer_offsets"})
# How far at least a rebuilt log starts past the last log end offset reported (or past the
# previous start when nothing was): what its leader handed out after its last heartbeat reached
# the metadata leader is never handed out again; no leader hands out 2**24 offsets within one
# heartbeat interval. A gap in offsets costs nothing (2**62 of them).
REBUILD_GAP = 1 << 24
# How far a rebuilt partition's leader epoch starts past the highest epoch heard of (or past the
# previous rebuild's epoch). The highest epoch heard is a floor, not a bound: a report may never
# have arrived (the metadata leader restarted and lost what it had heard, or the copy died before
# its first heartbeat), and the lost copy's leader is elected again by itself — each restart of
# its node, and each time it stops hearing the new leader's heartbeats — when a removed member
# comes back with its old copies and leads them on its stale configuration until it hears the
# rebuilt partition's leader. Had the rebuild started one epoch past what was heard, the old copy
# and the rebuilt one reached the same epoch with two leaders; followers, heartbeat routing
# (``leader_hints``) and clients fence by epoch alone, so the leader of the stale copy was taken
# for the current one (simulator seeds 35, 36, 37 and 39 of tests/sim/test_rebuild_sim.py). No
# copy goes through 2**16 elections unheard; epochs are 31-bit, so a partition can be rebuilt
# 2**15 times before the gap has to shrink to what still fits below ``REBUILD_EPOCH_CEILING``.
REBUILD_EPOCH_GAP = 1 << 16
# The highest epoch a rebuild hands out: its replica must be able to stand for epoch + 1, and peers
# refuse a message naming an epoch above ``partitions.host.MAX_EPOCH`` ((1 << 31) - 2).
REBUILD_EPOCH_CEILING = (1 << 31) - 3

class MetadataState:
    """Applied metadata; see the module docstring."""

    def __init__(self) -> None:
        self.applied_index = -1
        self.members: dict[str, dict] = {}
        self.topics: dict[str, TopicConfig] = {}
        # per topic, per partition: voters (first = preferred leader), learners, config version
        self.assignments: dict[str, list[list[str]]] = {}
        self.learners: dict[str, list[list[str]]] = {}
        self.versions: dict[str, list[int]] = {}
        self.ring = HashRing(())
        self.acl = Acl()
        # (topic, partition) -> the last rebuild applied: version, epoch, start, lost, known
        self.rebuilds: dict[tuple[str, int], dict] = {}
        self._targets: dict[str, list[list[str]]] = {}
        self.dissolved: str | None = None  # the formation a committed ``dissolve`` gave this cluster up to

    def holds_nothing(self) -> bool:
        """No topic, no grant, no rebuild applied: giving this cluster up loses nothing."""
        return not self.topics and self.acl.count == 0 and not self.rebuilds

    def apply(self, index: int, command: dict) -> str | tuple[str, int] | None:
        """Apply one committed command. Returns the name of a created topic, or the
        ``(topic, partition)`` whose replica configuration changed, or None."""
        assert index == self.applied_index + 1, f"metadata applied out of order: {index} after {self.applied_index}"
        self.applied_index = index
        if self.dissolved is not None:
            return None  # given up: the node forgets this state at its next formation tick
        op = command.get("op")
        if op == "dissolve":
            if self.holds_nothing():
                self.dissolved = str(command.get("into", ""))
            return None
        if op == "config":
            self.members = {node: dict(info) for node, info in command["members"].items()}
            placed = [node for node, info in self.members.items() if not info.get("leaving")]
            self.ring = HashRing(placed or self.members)
            self._targets.clear()
        elif op == "create_topic":
            config = TopicConfig.from_wire(command["config"])
            if config.name.startswith("__") and config.name not in INTERNAL_TOPICS:
                return None  # reserved; proposers refuse it too, so this is only defence in depth
            if config.name not in self.topics:
                assert len(command["assignment"]) == config.partitions
                self.topics[config.name] = config
                self.assignments[config.name] = [list(replicas) for replicas in command["assignment"]]
                self.learners[config.name] = [[] for _ in range(config.partitions)]
                self.versions[config.name] = [0] * config.partitions
                return config.name
        elif op == "reassign":
            return self._reassign(command)
        elif op == "acl":
            self.acl.apply(command)
        elif op == "rebuild":
            return self._rebuild(command)
        return None

    def _rebuild(self, command: dict) -> tuple[str, int] | None:
        topic, partition = command.get("topic"), command.get("partition")
        if topic not in self.topics or not isinstance(partition, int) or not 0 <= partition < len(
                self.assignments[topic]):
            return None
        key = (topic, partition)
        if command.get("version") != self.versions[topic][partition] or key not in self.lost_partitions():
            return None  # stale, repeated, or a copy is left after all: nothing to rebuild
        voters = list(command.get("replicas") or [])
        start, epoch = command.get("start"), command.get("epoch")
        previous = self.rebuilds.get(key, {})
        if (not voters or len(set(voters)) != len(voters) or not all(node in self.members for node in voters)
                or not isinstance(start, int) or start < previous.get("start", 0)
                or not isinstance(epoch, int) or epoch <= previous.get("epoch", 0)):
            return None
        self.assignments[topic][partition] = voters
        self.learners[topic][partition] = []
        self.versions[topic][partition] += 1
        end = command.get("end")
        self.rebuilds[key] = {"version": self.versions[topic][partition], "epoch": epoch, "start": start,
                              "first": int(command.get("first") or 0), "end": end if isinstance(end, int) else None}
        return key

    def lost_partitions(self) -> list[tuple[str, int]]:
        """Partitions none of whose voters is a member: every replica was removed for good."""
        if not self.members:
            return []
        return [(topic, p) for topic in sorted(self.assignments) for p, voters in enumerate(self.assignments[topic])
                if not any(node in self.members for node in voters)]

    def rebuild_command(self, topic: str, partition: int, known: tuple[int, int, int] | None) -> dict:
        """The ``rebuild`` command for a lost partition; ``known``: (highest leader epoch, highest
        log end offset, largest growth of the end between two reports) heard of it, None when
        nothing was."""
        previous = self.rebuilds.get((topic, partition), {})
        first = previous.get("start", 0)
        epoch, end, growth = known if known is not None else (0, first, 0)
        end = max(end, first)
        base = max(epoch, previous.get("epoch", 0))
        # past the base by the gap, or by as much as fits below the ceiling (at least by one)
        new_epoch = min(base + REBUILD_EPOCH_GAP, max(base + 1, REBUILD_EPOCH_CEILING))
        return {"op": "rebuild", "topic": topic, "partition": partition, "version": self.versions[topic][partition],
                "replicas": self.target(topic, partition), "epoch": new_epoch,
                "first": first, "end": end if known is not None else None,
                "start": end + max(2 * growth, REBUILD_GAP)}

    def _reassign(self, command: dict) -> tuple[str, int] | None:
        topic, partition = command.get("topic"), command.get("partition")
        if topic not in self.topics or not isinstance(partition, int) or not 0 <= partition < len(
                self.assignments[topic]):
            return None
        if command.get("version") != self.versions[topic][partition]:
            return None  # stale or repeated: another step was taken first
        voters, learners = list(command.get("replicas") or []), list(command.get("learners") or [])
        if not one_step(self.assignments[topic][partition], voters, learners, self.members):
            return None
        self.assignments[topic][partition] = voters
        self.learners[topic][partition] = learners
        self.versions[topic][partition] += 1
        return (topic, partition)

    def assign(self, config: TopicConfig) -> list[list[str]]:
        """Replica lists for a new topic from the ring over the committed membership."""
        copies = min(config.replication_factor, len(self.ring))
        return self.ring.placement(config.name, config.partitions, copies)

    def target(self, topic: str, partition: int) -> list[str]:
        """Where the ring over the current membership places the partition (what rebalancing
        moves it towards)."""
        targets = self._targets.get(topic)
        if targets is None:
            targets = self._targets[topic] = self.assign(self.topics[topic])
        return targets[partition]

    def replicas(self, topic: str, partition: int) -> list[str]:
        assignment = self.assignments.get(topic)
        if assignment is None or partition >= len(assignment):
            return []
        return assignment[partition]

    def partition_config(self, topic: str, partition: int) -> tuple[list[str], list[str], int]:
        """(voters, learners, version) of a partition."""
        return (self.assignments[topic][partition], self.learners[topic][partition],
                self.versions[topic][partition])

    def leader(self, topic: str, partition: int) -> str | None:
        replicas = self.replicas(topic, partition)
        return replicas[0] if replicas else None

    def assigned_to(self, node_id: str) -> int:
        """How many partitions (voter or learner) still name ``node_id``."""
        return sum(1 for topic in self.assignments for p in range(len(self.assignments[topic]))
                   if node_id in self.assignments[topic][p] or node_id in self.learners[topic][p])


def describe_rebuild(rebuild: dict) -> str:
    """What a rebuild (``MetadataState.rebuilds``, or a ``rebuild`` command) lost, in words."""
    first, end, start = rebuild["first"], rebuild["end"], rebuild["start"]
    if end is None:
        return (f"no leader of it was ever heard from, so which of offsets {first}..{start - 1} had been handed out "
                f"(and are lost) is unknown")
    lost = f"offsets {first}..{end - 1} are lost" if end > first else f"no offset from {first} on is known lost"
    return f"{lost}; offsets {end}..{start - 1} are lost too if they were handed out after the last report"

def one_step(voters: list[str], new_voters: list[str], new_learners: list[str], members: dict) -> bool:
    """Whether ``(new_voters, new_learners)`` may follow ``voters`` as one reassignment step.

    The voter sets differ by at most one member, so any majority of the old set and any
    majority of the new one overlap; that is what keeps one leader per epoch while replicas
    learn of the change at different times (``docs/architecture.md``, Rebalancing).
    """
    old, new = set(voters), set(new_voters)
    if not new or len(new) != len(new_voters) or len(set(new_learners)) != len(new_learners):
        return False
    if len(old ^ new) > 1 or new & set(new_learners):
        return False
    return all(node in members for node in (new - old) | set(new_learners))


def next_step(voters: list[str], learners: list[str], target: list[str], members: dict,
              caught_up: set[str], in_contact: set[str], self_id: str) -> tuple[list[str], list[str]] | None:
    """The partition leader's next reassignment step towards ``target``, or None to wait.

    ``caught_up``: learners and voters holding everything committed and in contact with the
    leader; ``in_contact``: replicas heard from lately. Order of preference:

    1. drop learners that are no longer wanted;
    2. drop a voter outside the target that is out of contact (a dead member: its copy helps
       nobody, and dropping it first keeps the majority small);
    3. add missing target members as learners (they copy the log without voting);
    4. promote a caught-up learner to voter;
    5. put the voters in target order, so the target's first member becomes the preferred
       leader (the current leader hands over to it once it has caught up);
    6. once every target member is a caught-up voter, drop a voter outside the target — never
       the leader itself (it hands leadership to the preferred replica first).
    """
    wanted = [node for node in target if node in members]
    kept_learners = [node for node in learners if node in wanted and node not in voters]
    if kept_learners != learners:
        return list(voters), kept_learners
    extra = [node for node in voters if node not in wanted]
    for node in extra:
        if node != self_id and node not in in_contact and len(voters) > 1:
            return [v for v in voters if v != node], list(learners)
    missing = [node for node in wanted if node not in voters and node not in learners]
    if missing:
        return list(voters), list(learners) + missing
    for node in learners:
        if node in caught_up:
            return _ordered(voters + [node], wanted), [n for n in learners if n != node]
    ordered = _ordered(voters, wanted)
    if ordered != voters:
        return ordered, list(learners)
    if extra and all(node in voters and node in caught_up for node in wanted if node != self_id):
        for node in extra:
            if node != self_id:
                return [v for v in voters if v != node], list(learners)
    return None


def _ordered(voters: list[str], wanted: list[str]) -> list[str]:
    """Voters in target order first, then the others in their current order."""
    return [n for n in wanted if n in voters] + [n for n in voters if n not in wanted]
