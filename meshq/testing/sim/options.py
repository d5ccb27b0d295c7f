"""What one simulated run is: its cluster, workload, phases, membership changes and fault rates.

Theory of operation
-------------------
A run is declared, not scripted. ``SimOptions`` names the cluster's shape (storage nodes,
clients, partitions, fsync policy), the workload (produce cadence, acks levels), the two
phases (``fault_s`` of faults, then ``liveness_s`` to converge), the membership changes
(``joins_s``, ``leave``, ``outage``) and the clients' calling threads (``calling_threads``); ``FaultOptions`` holds the fault rates the network and
the fault injector draw against. ``SimOptions.swarm(seed)`` draws all of it from the seed
(swarm testing), the power losses of runs without fsync=always (fsync=never in some, power
losses in more), the membership changes and the calling threads each from a stream of their
own so that adding them left every other draw as it was. The constants below are shared by every part of the simulator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

CLUSTER = "sim"
WALL_BASE_MS = 1_700_000_000_000  # the simulated wall clock starts here (records, retention)
TOPIC = "events"


@dataclass(frozen=True)
class FaultOptions:
    """Fault rates; probabilities per message, rates per simulated second."""

    drop: float = 0.0
    duplicate: float = 0.0
    latency_s: tuple[float, float] = (0.0002, 0.003)
    partition_rate: float = 0.0
    kill_rate: float = 0.0
    power_rate: float = 0.0
    pause_rate: float = 0.0
    clock_jump_rate: float = 0.0
    bitflip_rate: float = 0.0  # a flipped bit in a sealed segment of a node's log
    # per message: its frames reach the target damaged (a flipped bit, cut short, or random bytes),
    # as a hostile or broken peer would send them; swarm never draws it (the pinned traces stay)
    corrupt: float = 0.0
    disk_full_rate: float = 0.0  # a node's disk fills (below its reserve, a few KB left) for down_s
    # a link cut this long drops its connections: each end is told ``PeerDisconnected`` (as the runtime's monitor
    # tells it after the heartbeat timeout); 0: never (swarm never draws it: the pinned traces stay)
    disconnect_s: float = 0.0
    partial_writeback: float = 0.5  # at a power loss: chance that a prefix of the unsynced tail survives
    down_s: tuple[float, float] = (0.5, 4.0)

    @property
    def any(self) -> bool:
        return any((self.drop, self.duplicate, self.partition_rate, self.kill_rate, self.power_rate,
                    self.pause_rate, self.clock_jump_rate, self.bitflip_rate, self.corrupt, self.disk_full_rate))


@dataclass(frozen=True)
class SimOptions:
    """One simulated run. ``swarm(seed)`` draws a shape per seed."""

    seed: int
    nodes: int = 3
    clients: int = 1
    partitions: int = 4
    fsync: str = "interval"
    fault_s: float = 12.0
    liveness_s: float = 20.0
    produce_interval_s: float = 0.05
    acks: tuple[str, ...] = ("leader", "quorum")
    faults: FaultOptions = field(default_factory=FaultOptions)
    # Membership changes (node ids n1..nN are the first nodes; joiners follow them):
    joins_s: tuple[float, ...] = ()  # one extra storage node per entry, booting at that time
    # (node, when, asked through "client" c1 as `meshq leave --node-id` does, or the "node" itself)
    leave: tuple[str, float, str] | None = None
    # (node, from, until): a kill that outlasts member_timeout_s; until None = the liveness phase
    outage: tuple[str, float, float | None] | None = None
    member_timeout_s: float = 60.0
    # of every topic; below 3 an outage can remove every replica of a partition (it is rebuilt)
    replication_factor: int = 3
    calling_threads: int = 0  # per client: threads whose Node.produce is sent from the thread itself
    # the consumer group's members on nodes g1, g2 (meshq.testing.sim.group); False: no such nodes
    # (their gossip lets a client cut off from every storage node relearn them without its seeds)
    group_members: bool = True
    shared: bool = False  # the shared-subscription workload (meshq.testing.sim.shared) runs too
    pubsub: bool = False  # publishers and subscribers on every node (meshq.testing.sim.pubsub)
    rpc: bool = False  # request/reply (meshq.testing.sim.rpc): services on the storage nodes, callers on clients
    acl: bool = False  # grants and revokes through the metadata group (meshq.testing.sim.acl); never swarm-drawn
    # with acl: publish/subscribe grants too (their way to client nodes' views: acl_view carries them);
    # off, the grants drawn are the request/serve/topic ones only, as before this option existed
    acl_pubsub: bool = False
    # (node, from, until, extra one-way delay s): every message to or from that node takes that much longer in
    # the window, a link slow but alive (never swarm-drawn); the checker requires that it leads nothing at ``until``
    slow: tuple[str, float, float, float] | None = None
    # (node, from, until, stopped s, running s): in the window that node is paused for ``stopped`` then runs for
    # ``running``, over and over (a CPU it gets only in bursts: a starved or throttled process, a SIGSTOP loop);
    # never swarm-drawn; the checker requires that it leads nothing at ``until``
    starve: tuple[str, float, float, float, float] | None = None
    # (k, until): the last k first storage nodes start as a mesh of their own (each seeded with the others),
    # no message crossing between the two groups until ``until``, when that first one discovers n1 (two LANs
    # joined, or one seed list split): two clusters of one name that then meet. The group of n1 gets the topics
    # the clients create, so the other one holds nothing and gives itself up (never swarm-drawn)
    apart: tuple[int, float] | None = None
    max_events: int = 300_000  # a bound on the run: more means a message storm (a run takes ~10k-60k)

    @property
    def storage_ids(self) -> list[str]:
        """Every storage node of the run, joiners included."""
        return [f"n{i + 1}" for i in range(self.nodes + len(self.joins_s))]

    @property
    def apart_ids(self) -> list[str]:
        """The storage nodes that start as a group of their own (``apart``), first the one the others seed with."""
        return self.storage_ids[self.nodes - self.apart[0]:self.nodes] if self.apart is not None else []

    @classmethod
    def swarm(cls, seed: int) -> SimOptions:
        """Each seed draws its own cluster size, fault rates and workload (swarm testing)."""
        rng = random.Random(f"swarm-{seed}")
        faults = FaultOptions(
            drop=rng.choice([0.0, 0.0, 0.01, 0.05]),
            duplicate=rng.choice([0.0, 0.01, 0.05]),
            latency_s=rng.choice([(0.0002, 0.002), (0.001, 0.02), (0.0002, 0.1)]),
            partition_rate=rng.choice([0.0, 0.05, 0.2]),
            kill_rate=rng.choice([0.0, 0.05, 0.15]),
            power_rate=rng.choice([0.0, 0.0, 0.05]),
            pause_rate=rng.choice([0.0, 0.05]),
            clock_jump_rate=rng.choice([0.0, 0.05]),
            bitflip_rate=rng.choice([0.0, 0.0, 0.03]),
        )
        options = cls(seed=seed, nodes=rng.choice([1, 3, 3, 5]), clients=rng.choice([1, 2]),
                      partitions=rng.choice([1, 4, 8]), fsync=rng.choice(["always", "interval"]),
                      acks=rng.choice([("leader",), ("leader", "quorum"), ("none", "leader", "all")]),
                      faults=faults)
        options = options._with_power_losses(random.Random(f"power-{seed}"))
        options = options._with_membership_changes(random.Random(f"members-{seed}"))
        # Calling threads (meshq.testing.sim.threads) in most runs; a stream of its own again.
        return replace(options, calling_threads=random.Random(f"threads-{seed}").choice([0, 1, 1, 2]))

    def _with_power_losses(self, rng: random.Random) -> SimOptions:
        """Turn some fsync=interval runs into fsync=never, and give some runs without an fsync per
        write power losses they lacked (a separate stream: other draws stay as they were): a power
        loss must never fork a partition's log under any fsync mode."""
        if self.fsync == "always":
            return self
        fsync = "never" if rng.random() < 0.4 else self.fsync
        faults = self.faults
        if not faults.power_rate and rng.random() < 0.3:
            faults = replace(faults, power_rate=0.05)
        return replace(self, fsync=fsync, faults=faults)

    def _with_membership_changes(self, rng: random.Random) -> SimOptions:
        """Draw joins, a leave and an outage (a separate stream: other draws stay as they were)."""
        fault_s, member_timeout_s, faults = self.fault_s, self.member_timeout_s, self.faults
        initial = [f"n{i + 1}" for i in range(self.nodes)]
        outage = None
        if self.nodes >= 3 and rng.random() < 0.2:
            # Long enough a fault phase for the removal and the copies to happen within it, and
            # milder node faults and partitions: the metadata leader removes a member only after
            # hearing nothing from it for member_timeout_s while it keeps a majority itself.
            member_timeout_s = round(rng.uniform(6.0, 8.0), 1)
            fault_s = max(fault_s, 18.0)
            faults = replace(faults, **{name: min(getattr(faults, name), 0.05) for name in (
                "partition_rate", "kill_rate", "power_rate", "pause_rate")})
            start = round(rng.uniform(3.0, fault_s - member_timeout_s - 4.0), 3)
            until = start + member_timeout_s + rng.uniform(3.0, 5.0)
            outage = (rng.choice(initial), start, round(until, 3) if rng.random() < 0.5 else None)
        joins: tuple[float, ...] = ()
        if rng.random() < 0.2:
            joins = tuple(sorted(round(rng.uniform(3.0, fault_s - 3.0), 3) for _ in range(rng.choice([1, 1, 2]))))
        leave = None
        if self.nodes + len(joins) - 1 >= 3 and rng.random() < 0.4:
            candidates = [n for n in initial if outage is None or n != outage[0]]
            leave = (rng.choice(candidates), round(rng.uniform(3.0, fault_s - 3.0), 3), rng.choice(["client", "node"]))
        return replace(self, fault_s=fault_s, member_timeout_s=member_timeout_s, faults=faults, joins_s=joins,
                       leave=leave, outage=outage)
