"""The fault injector: what happens to nodes and their disks, drawn from ``FaultOptions``.

Theory of operation
-------------------
Every 0.1 s of the fault phase, ``step`` draws each fault against its rate (per simulated
second) in a fixed order, so one seed always injects the same faults at the same moments:

* **Partitions.** A cut between a random side of the storage nodes and everyone else, now and
  then with one bridge link left (non-transitive); the next partition draw heals it instead.
* **Crashes.** ``kill`` drops a node's core but keeps its disk as it was (a process crash: the
  page cache survives); ``power`` also loses every byte not yet fsynced
  (``MemoryStorage.crash``) — or, with ``partial_writeback``, only part of it, as when the OS
  had written some dirty pages back (a torn last batch ends the same way once recovery cuts
  it). A crashed node restarts from its disk after ``down_s``.
* **Pauses.** The node is frozen: its messages and timers wait, then arrive late.
* **Bit flips.** One bit flips inside a batch of a sealed segment of the node's log.
* **Disk full.** The node's disk keeps only a few KB free, below its ``min_free_bytes``
  reserve: the node must refuse new records (``partitions.space``), serve reads, and accept
  writes again once space returns ``down_s`` later (``free_disk``).
* **Clock jumps.** The node's wall clock (record timestamps, retention) moves by up to an
  hour either way; its monotonic clock never does.

Two faults are tied to membership changes rather than drawn per tick: the outage
(``SimOptions.outage``) kills a node for longer than ``member_timeout_s`` so that the metadata
leader removes it; and the step nemesis, right after a reassign step commits, now and then
crashes a replica of that partition, since a configuration change is most fragile then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshq.core import batch as batch_format
from meshq.testing.sim.options import TOPIC

if TYPE_CHECKING:
    from meshq.testing.sim.node import SimNode
    from meshq.testing.sim.simulation import Simulation

STEP_NEMESIS_CHANCE = 0.05  # per committed reassign step, in runs with node faults
DISK_FULL_SLACK_BYTES = 8192  # what a full disk still has free (its reserve is twice that)


class FaultInjector:
    """Injects the run's node, disk and network faults into the simulation that holds it."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    def step(self) -> None:
        """One tick of the fault phase (every 0.1 s): maybe cut or heal the network, and for each
        storage node that is up, maybe one of: kill, power loss, pause, bit flip, clock jump."""
        sim = self.sim
        faults = sim.options.faults
        storage_ids = sorted(n for n, node in sim.nodes.items() if node.role == "storage" and node.present)
        step_s = 0.1
        rng = sim.rng

        def chance(rate: float) -> bool:
            return rate > 0 and rng.random() < rate * step_s

        if chance(faults.partition_rate) and len(storage_ids) > 1:
            if sim.network.partitioned:
                sim.log("heal")
                sim.network.heal()
            else:
                side = set(rng.sample(storage_ids, rng.randrange(1, len(storage_ids))))
                sim.network.partition(side)
                if len(storage_ids) >= 3 and rng.random() < 0.3:  # non-transitive: one bridge link survives
                    inside, outside = sorted(side), sorted(set(storage_ids) - side)
                    sim.network.bridge(rng.choice(inside), rng.choice(outside))
                sim.stats["partitions"] += 1
                sim.log(f"partition {sorted(side)}")
        for node_id in storage_ids:
            node = sim.nodes[node_id]
            if not node.up:
                continue
            if chance(faults.kill_rate):
                self.crash(node, power=False)
            elif chance(faults.power_rate):
                self.crash(node, power=True)
            elif chance(faults.pause_rate):
                node.paused_until_s = sim.now_s + rng.uniform(0.5, 5.0)
                sim.stats["pauses"] += 1
                sim.log(f"pause {node_id} until {node.paused_until_s:.3f}")
            elif chance(faults.bitflip_rate):
                self._flip_bit(node)
            elif chance(faults.clock_jump_rate):
                node.wall_offset_ms += rng.choice([-1, 1]) * rng.randrange(1000, 3_600_000)
                sim.stats["clock_jumps"] += 1
                sim.log(f"clock {node_id} {node.wall_offset_ms:+d} ms")
            elif chance(faults.disk_full_rate):
                self._fill_disk(node)

    def _fill_disk(self, node: SimNode) -> None:
        """The node's disk fills: a few KB left, below its reserve (so the node must refuse new
        records though a small one would still fit); space returns after ``down_s``."""
        sim = self.sim
        assert node.storage is not None
        if node.node_id in sim.checker.space.full_disks:
            return
        node.storage.set_capacity(node.storage.used_bytes + DISK_FULL_SLACK_BYTES, 2 * DISK_FULL_SLACK_BYTES)
        sim.checker.space.on_disk_full(node.node_id)
        sim.stats["disk_full"] = sim.stats.get("disk_full", 0) + 1
        sim.log(f"disk full {node.node_id}")
        sim.at(sim.now_s + sim.rng.uniform(*sim.options.faults.down_s), "disk_free", node.node_id)

    def free_disk(self, node_id: str) -> None:
        """Space returns on the node's disk (the end of a ``_fill_disk``)."""
        sim = self.sim
        node = sim.nodes[node_id]
        assert node.storage is not None
        node.storage.set_capacity(None, 0)
        sim.checker.space.on_disk_free(node_id, sim.now_s)
        sim.log(f"disk free {node_id}")

    def _flip_bit(self, node: SimNode) -> None:
        """Flip one bit inside a batch of a *sealed* segment of one of the node's logs."""
        sim = self.sim
        assert node.storage is not None
        candidates = []
        for key, disk in sorted(node.storage._disks.items()):  # the simulated disk: reaching in is the point
            if key[0] == TOPIC:
                for segment in disk.segments[:-1]:
                    candidates.extend((key, segment, i) for i in range(len(segment.batches)))
        if not candidates:
            return
        key, segment, index = sim.rng.choice(candidates)
        batch = bytearray(segment.batches[index])
        sim.checker.before_disk_damage(key[1], bytes(batch), node.node_id)
        position = sim.rng.randrange(batch_format.HEADER_SIZE, len(batch))
        batch[position] ^= 1 << sim.rng.randrange(8)
        segment.batches[index] = bytes(batch)
        sim.stats["bitflips"] += 1
        sim.log(f"bitflip {node.node_id} {key[0]}/{key[1]} batch at {segment.headers[index].base_offset}")

    def _partial_writeback(self, node: SimNode) -> None:
        """Before a power loss the OS may have written back part of the unsynced tail: keep a
        random prefix of it (a torn last write ends the same way once recovery cuts it)."""
        sim = self.sim
        assert node.storage is not None
        for _key, disk in sorted(node.storage._disks.items()):
            boundaries = [header.next_offset for segment in disk.segments for header in segment.headers
                          if header.next_offset > disk.synced_offset]
            if boundaries and sim.rng.random() < 0.5:
                disk.synced_offset = sim.rng.choice(boundaries)

    def crash(self, node: SimNode, power: bool, restart: bool = True) -> None:
        """Stop the node's core as a process crash does (``power``: a power loss, which also loses
        what was not fsynced) and, unless told not to, restart it after ``FaultOptions.down_s``."""
        sim = self.sim
        assert node.core is not None and node.storage is not None
        if power and sim.rng.random() < sim.options.faults.partial_writeback:
            self._partial_writeback(node)
        sim.checker.before_crash(node, power)
        node.core = None
        node.timer_at_s = float("inf")
        if power:
            node.storage.crash()
            sim.stats["power"] += 1
        else:
            sim.stats["kills"] += 1
        sim.log(f"{'power-off' if power else 'kill'} {node.node_id}")
        if restart:
            sim.at(sim.now_s + sim.rng.uniform(*sim.options.faults.down_s), "restart",
                   (node.node_id, node.incarnation))

    def start_outage(self) -> None:
        """Kill the outage node for longer than member_timeout_s: the metadata leader removes it."""
        sim = self.sim
        assert sim.options.outage is not None
        node_id, _start_s, until_s = sim.options.outage
        node = sim.nodes[node_id]
        node.down_until_s = until_s if until_s is not None else float("inf")
        sim.stats["outages"] += 1
        sim.log(f"outage {node_id} until {'the liveness phase' if until_s is None else f'{until_s:.3f}'}")
        if node.core is not None:
            self.crash(node, power=False, restart=False)
        if until_s is not None:
            sim.at(until_s, "restart", (node_id, node.incarnation))

    def step_nemesis(self) -> None:
        """Right after a reassign step commits, now and then crash a replica of that partition
        (its leader, a voter or a learner): the moment a configuration change is most fragile."""
        sim = self.sim
        steps, sim.checker.new_steps = sim.checker.new_steps, []
        if not sim.faulting or not (sim.options.faults.kill_rate or sim.options.faults.power_rate):
            return
        for topic, partition in steps:
            if sim.rng.random() >= STEP_NEMESIS_CHANCE:
                continue
            voters, learners, _version = sim.checker.meta.partition_config(topic, partition)
            candidates = sorted(n for n in set(voters) | set(learners)
                                if n in sim.nodes and sim.nodes[n].up and sim.nodes[n].present)
            if candidates:
                node = sim.nodes[sim.rng.choice(candidates)]
                sim.log(f"step nemesis: {topic}/{partition} moved")
                self.crash(node, power=bool(sim.options.faults.power_rate) and sim.rng.random() < 0.5)
