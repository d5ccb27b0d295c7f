"""Failover: kill -9 of a partition leader while writers produce, timed until its partitions take writes again.

Theory of operation
-------------------
``--failover-repeats`` (3) failovers on a fresh replicated topic: one writer thread per
partition (``_Writer``) produces one record at a time (``--failover-acks``, each call with a
``--failover-timeout`` of 0.5 s) for 1 s (``FAILOVER_PRE_KILL_S``), then a node leading at
least one partition (rotating over the nodes) is killed with SIGKILL. For each partition it
led, the failover time is from just before ``os.kill`` to the end of the first successful call
*started* after it; the repeat's figure is the last of its partitions to come back. The
writers of the other partitions give the longest stall they saw. Then the killed node is
restarted on its data (same ports) and the next repeat waits until it is back and in sync.
A partition that does not come back is probed from a fresh client, to tell a stuck producer
from a stuck partition.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
import threading
import time
from typing import Any

from meshq.bench.console import _progress
from meshq.bench.errors import BenchError, _error_text
from meshq.bench.procs import _Cluster
from meshq.bench.status import CLUSTER_READY_TIMEOUT_S, _topic_partitions, _wait_cluster
from meshq.bench.targets import TARGET_FAILOVER_SLACK_S
from meshq.errors import MeshqError

FAILOVER_PRE_KILL_S = 1.0  # writers run this long before the kill (and must succeed on the victim's partitions)
FAILOVER_WRITER_PAUSE_S = 0.005  # between one failover writer's calls: the timing resolution, a light load


def _default_failure_timeout_s() -> float:
    """The nodes' ``failure_timeout_s`` (``meshq node`` runs with the NodeConfig default)."""
    from meshq.config import NodeConfig

    return float(next(f.default for f in dataclasses.fields(NodeConfig) if f.name == "failure_timeout_s"))


class _Writer:
    """Produces one record at a time to one partition until stopped, recording (start, end, error) per call."""

    def __init__(self, client: Any, topic: str, partition: int, value: bytes, acks: str, timeout_s: float,
                 stop: threading.Event) -> None:
        self.client = client
        self.topic = topic
        self.partition = partition
        self.value = value
        self.acks = acks
        self.timeout_s = timeout_s
        self.stop = stop
        self.calls: list[tuple[float, float, str | None]] = []
        self.last_error = ""  # the whole text of the latest failure
        self.thread = threading.Thread(target=self._run, name=f"bench-writer-{partition}", daemon=True)

    def _run(self) -> None:
        clock = time.monotonic
        while not self.stop.is_set():
            started = clock()
            error = None
            try:
                self.client.produce(self.topic, self.value, acks=self.acks, timeout=self.timeout_s,
                                    partition=self.partition)
            except Exception as exc:  # every failure is data here: the outage is what is measured
                error = type(exc).__name__
                self.last_error = _error_text(exc)[:300]
            ended = clock()
            self.calls.append((started, ended, error))
            if error is None or ended - started < FAILOVER_WRITER_PAUSE_S:
                self.stop.wait(FAILOVER_WRITER_PAUSE_S)  # a steady trickle, not a busy loop

    def first_success_after(self, moment: float) -> float | None:
        """End time of the first successful call that started at or after ``moment``."""
        for started, ended, error in list(self.calls):
            if error is None and started >= moment:
                return ended
        return None

    def last_error_before(self, moment: float) -> str | None:
        errors = [error for _s, ended, error in list(self.calls) if error is not None and ended <= moment]
        return errors[-1] if errors else None

    def successes_between(self, begin: float, end: float) -> int:
        return sum(1 for started, ended, error in list(self.calls) if error is None and begin <= ended <= end)

    def errors_between(self, begin: float, end: float) -> collections.Counter:
        return collections.Counter(error for started, ended, error in list(self.calls)
                                   if error is not None and begin < ended <= end)

    def longest_stall(self, begin: float, end: float) -> float:
        """The longest time within [begin, end] without a successful call completing."""
        previous = begin
        longest = 0.0
        for _started, ended, error in list(self.calls):
            if error is None and begin <= ended <= end:
                longest = max(longest, ended - previous)
                previous = ended
        return max(longest, end - previous)


def _probe_with_fresh_client(args: Any, cluster: _Cluster, topic: str, partitions: list[int]) -> dict[str, str]:
    """One write per partition from a new client: tells a stuck producer from a stuck partition."""
    from meshq.node import Node

    outcome: dict[str, str] = {}
    probe = Node(cluster=args.cluster, seeds=[cluster.seed(i) for i, child in enumerate(cluster.children)
                                              if child is not None and child.proc.poll() is None],
                 mdns=False, role="client")
    try:
        probe.start()
        probe.wait_ready(timeout=5.0)
        for p in partitions:
            started = time.monotonic()
            try:
                probe.produce(topic, b"probe", acks=args.failover_acks, timeout=2.0, partition=p)
                outcome[str(p)] = f"ok in {time.monotonic() - started:.3f} s"
            except MeshqError as exc:
                outcome[str(p)] = type(exc).__name__
    except MeshqError as exc:
        outcome["client"] = _error_text(exc)
    finally:
        probe.stop()
    return outcome


def _failover_repeat(client: Any, cluster: _Cluster, topic: str, args: Any, repeat: int,
                     restart_after: bool) -> dict[str, Any]:
    """Kill -9 a partition leader while writers produce to every partition; time until its partitions take writes."""
    status, problem = _wait_cluster(client, topic, cluster, CLUSTER_READY_TIMEOUT_S, need_in_sync=False)
    if status is None:
        return {"repeat": repeat, "error": f"the cluster was not ready before the kill: {problem}"}
    in_sync_status, in_sync_problem = _wait_cluster(client, topic, cluster, args.in_sync_timeout, need_in_sync=True)
    if in_sync_status is not None:
        status = in_sync_status
    leaders = {p["partition"]: p["leader"] for p in _topic_partitions(status, topic)}
    # spread the kills over the nodes: the least killed node that leads something, in rotation
    order = [cluster.node_ids[(repeat + k) % cluster.count] for k in range(cluster.count)]
    candidates = [node_id for node_id in order if node_id in leaders.values()]
    victim = min(candidates, key=lambda n: cluster.kills[cluster.node_ids.index(n)]) if candidates else None
    if victim is None:
        return {"repeat": repeat, "error": f"no node leads a partition of {topic}: {leaders}"}
    victim_index = cluster.node_ids.index(victim)
    victim_partitions = sorted(p for p, leader in leaders.items() if leader == victim)
    other_partitions = sorted(p for p in leaders if p not in victim_partitions)
    result: dict[str, Any] = {
        "repeat": repeat, "victim": victim, "victim_label": cluster.label(victim),
        "victim_was_metadata_leader": status.get("metadata", {}).get("leader") == victim,
        "partitions": victim_partitions, "in_sync_before_kill": in_sync_problem is None,
    }
    if in_sync_problem is not None:
        result["in_sync_problem"] = in_sync_problem
    stop = threading.Event()
    value = os.urandom(args.value_bytes)
    writers = {p: _Writer(client, topic, p, value, args.failover_acks, args.failover_timeout, stop)
               for p in sorted(leaders)}
    for writer in writers.values():
        writer.thread.start()
    killed_at = end = 0.0
    try:
        warm_until = time.monotonic() + FAILOVER_PRE_KILL_S
        while time.monotonic() < warm_until:
            time.sleep(0.02)
        # leadership may have moved meanwhile (a restarted preferred leader takes its partitions back)
        try:
            leaders = {p["partition"]: p["leader"] for p in _topic_partitions(client.status(timeout=2.0), topic)}
        except MeshqError:
            pass
        victim_partitions = sorted(p for p, leader in leaders.items() if leader == victim)
        other_partitions = sorted(p for p in leaders if p not in victim_partitions)
        result["partitions"] = victim_partitions
        if not victim_partitions:
            result["error"] = f"{cluster.label(victim)} no longer leads a partition; nothing was killed"
            return result
        now = time.monotonic()
        idle = [p for p in victim_partitions if writers[p].successes_between(now - FAILOVER_PRE_KILL_S, now) == 0]
        if idle:
            result["error"] = ("writes did not succeed before the kill on partition(s) "
                               + ", ".join(f"{p} (last error {writers[p].last_error_before(now)})" for p in idle)
                               + f" at acks={args.failover_acks}; nothing was killed")
            return result
        killed_at = cluster.kill(victim_index)
        deadline = killed_at + args.failover_deadline
        while time.monotonic() < deadline:
            if all(writers[p].first_success_after(killed_at) is not None for p in victim_partitions):
                break
            time.sleep(0.005)
        end = time.monotonic()
    finally:
        stop.set()
        for writer in writers.values():
            writer.thread.join(args.failover_timeout + 5.0)
    recovery: dict[int, float | None] = {}
    for p in victim_partitions:
        back = writers[p].first_success_after(killed_at)
        recovery[p] = None if back is None else back - killed_at
    recovered = [s for s in recovery.values() if s is not None]
    result["recovery_s"] = {str(p): (None if s is None else round(s, 4)) for p, s in recovery.items()}
    result["first_s"] = min(recovered) if recovered else None
    result["all_s"] = max(recovered) if len(recovered) == len(victim_partitions) else None
    if result["all_s"] is None:
        stuck = [p for p, s in recovery.items() if s is None]
        result["error"] = (f"writes to {len(stuck)} of the killed leader's {len(victim_partitions)} partitions "
                           f"did not succeed within {args.failover_deadline:g} s")
        result["last_errors"] = {str(p): writers[p].last_error for p in stuck}
        result["fresh_client_probe"] = _probe_with_fresh_client(args, cluster, topic, stuck)
        result["error"] += "; a fresh client then got: " + ", ".join(
            f"partition {p}: {outcome}" for p, outcome in result["fresh_client_probe"].items())
        result["error"] += f"; the writers' last error (partition {stuck[0]}): {writers[stuck[0]].last_error}"
    outage_end = killed_at + (result["all_s"] if result["all_s"] is not None else end - killed_at)
    errors: collections.Counter = collections.Counter()
    for p in victim_partitions:
        errors.update(writers[p].errors_between(killed_at, outage_end))
    result["failed_calls"] = dict(errors)
    if other_partitions:
        result["others_longest_stall_s"] = max(writers[p].longest_stall(killed_at, outage_end)
                                               for p in other_partitions)
        others_errors: collections.Counter = collections.Counter()
        for p in other_partitions:
            others_errors.update(writers[p].errors_between(killed_at, outage_end))
        result["others_failed_calls"] = dict(others_errors)
    try:
        after = client.status(timeout=2.0)
        moved = [p for p in _topic_partitions(after, topic) if p["partition"] in victim_partitions]
        result["new_leaders"] = {str(p["partition"]): p["leader"] for p in moved}
        result["in_sync_after"] = {str(p["partition"]): p["in_sync"] for p in moved}
    except MeshqError:
        pass
    if restart_after:
        cluster.restart(victim_index)
    return result


def _run_failover(client: Any, cluster: _Cluster, topic: str, args: Any) -> dict[str, Any]:
    failure_timeout_s = _default_failure_timeout_s()
    out: dict[str, Any] = {"topic": topic, "acks": args.failover_acks, "write_timeout_s": args.failover_timeout,
                           "deadline_s": args.failover_deadline, "failure_timeout_s": failure_timeout_s,
                           "target_s": failure_timeout_s + TARGET_FAILOVER_SLACK_S, "repeats": []}
    for repeat in range(args.failover_repeats):
        _progress(f"failover {repeat + 1} of {args.failover_repeats}")
        try:
            result = _failover_repeat(client, cluster, topic, args, repeat,
                                      restart_after=repeat + 1 < args.failover_repeats)
        except (BenchError, MeshqError) as exc:  # e.g. the killed node did not come back
            out["repeats"].append({"repeat": repeat, "error": _error_text(exc)})
            break
        out["repeats"].append(result)
        if "victim" not in result or "recovery_s" not in result:
            break  # the cluster is not in a state to repeat: the reason is in this repeat's error
    measured = [r["all_s"] for r in out["repeats"] if r.get("all_s") is not None]
    out["recovered"] = len(measured)
    out["median_s"] = statistics.median(measured) if measured else None
    firsts = [r["first_s"] for r in out["repeats"] if r.get("first_s") is not None]
    out["median_first_s"] = statistics.median(firsts) if firsts else None
    return out
