"""``meshq bench rebalance``: how fast a membership change moves data (docs/architecture.md, Rebalancing).

Theory of operation
-------------------
On the same kind of cluster as ``bench replication`` (``_Cluster``: ``--nodes`` children, mDNS
off, seeds):

1. **Preload**: a topic of ``REBALANCE_PARTITIONS`` (12) partitions with
   ``--replication-factor`` (3) replicas gets ``--records`` values of ``--value-bytes`` at
   ``acks=quorum`` (the pipelined ``produce_batch`` loop of produce.py, one run); then every
   replica must be in sync, and the size of every node's data directory is recorded.
2. **Join**: one more node is started, seeded with the others. The clock runs from just before
   its process starts until a status shows the ring of all the nodes, ``handoffs == 0``, every
   partition on the replica set ``HashRing`` computes for the new membership and every replica
   in sync (polled every ``REBALANCE_POLL_S``). Reported: that time, when the node printed
   ready and when the ring changed, the partitions whose replica set changed beside those the
   ring predicts (``meshq.core.ring.moved_partitions`` over the old and new members), the
   bytes moved (the size, at the start, of the moved partitions' directories) and MB/s, and
   what the new node's data directory holds at the end.
3. **Leave** (when ``Node.leave`` exists; ``--skip-leave`` skips it): one of the first nodes
   that does not lead the metadata log is asked to leave; the same clock and figures, the
   receivers being the other nodes; the leaving node must exit by itself.
4. With ``--load-rate N|max``, a producer (load.py) writes from ``LOAD_BEFORE_S`` before the
   join to the end: its throughput and batch latency in the ``LOAD_BEFORE_S`` before each move
   and during it show what the copy costs producers.

At the end the high watermarks must add up to the acknowledged records (plus at most those of
the producer's failed batches, whose fate is unknown). Per-thread CPU of the preload and of each
move is reported as for the other scenarios.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from typing import Any

from meshq.bench.console import _progress
from meshq.bench.cpu import _CpuSampler
from meshq.bench.errors import BenchError, _error_text
from meshq.bench.load import LOAD_BATCH, LOAD_BEFORE_S, LOAD_WINDOW, _LoadWriter
from meshq.bench.procs import _Cluster, _node_tails
from meshq.bench.produce import PHASE_TIMEOUT_S, _pipelined_batch, _values
from meshq.bench.status import (
    CLUSTER_READY_TIMEOUT_S,
    _health_problem,
    _start_with_client,
    _topic_partitions,
    _wait_cluster,
    _wait_high_watermarks,
)
from meshq.errors import MeshqError

REBALANCE_PARTITIONS = 12  # partitions of the `bench rebalance` topic
REBALANCE_POLL_S = 0.25  # status polls while a partition move runs: the timing resolution of a join or leave


def _dir_bytes(path: str) -> int:
    """Apparent size of every file under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # deleted meanwhile (a dropped replica, a rolled segment)
                pass
    return total


def _placement(status: dict, topic: str) -> dict[int, dict]:
    """Per partition of ``topic``: replicas, leader, learners, target as ``status`` shows them."""
    return {p["partition"]: {"replicas": list(p["replicas"]), "leader": p["leader"],
                             "learners": list(p.get("learners", [])), "target": list(p.get("target", p["replicas"]))}
            for p in _topic_partitions(status, topic)}


def _rebalance_problem(status: dict, topic: str, node_ids: list[str], replication_factor: int, partitions: int,
                       expected: dict[int, list[str]]) -> str | None:
    """Why the move to ``node_ids`` is not finished, or None: the ring is exactly ``node_ids``, the cluster
    reports no handoff, every replica set is the ring's (``expected``) and every replica is in sync."""
    ring = set(status.get("ring", {}).get("members", []))
    if ring != set(node_ids):
        return f"ring members {sorted(ring)}, expected {sorted(node_ids)}"
    handoffs = status.get("handoffs")
    if handoffs is None:
        return "status has no handoffs count"
    if handoffs:
        return f"{handoffs} handoff(s) in progress"
    placement = _placement(status, topic)
    for p, want in sorted(expected.items()):
        have = placement.get(p, {}).get("replicas", [])
        if set(have) != set(want):
            return f"partition {p}: replicas {have}, the ring places it on {want}"
    return _health_problem(status, topic, node_ids, replication_factor, need_in_sync=True,
                           partitions_expected=partitions)


def _wait_rebalanced(client: Any, topic: str, node_ids: list[str], replication_factor: int, partitions: int,
                     expected: dict[int, list[str]], t0: float, timeout_s: float) -> dict[str, Any]:
    """Poll status from ``t0`` until ``_rebalance_problem`` says the move is done.

    Returns ``done_s`` (None on timeout, with ``problem``), ``ring_s`` (first status whose ring is
    ``node_ids``), ``first_handoff_s`` / ``max_handoffs`` and the last status seen."""
    out: dict[str, Any] = {"done_s": None, "ring_s": None, "first_handoff_s": None, "max_handoffs": 0,
                           "status_polls": 0, "status_failures": 0}
    deadline = t0 + timeout_s
    problem = "no status answer"
    while True:
        try:
            status = client.status(timeout=2.0)
        except MeshqError as exc:
            out["status_failures"] += 1
            problem = f"status failed: {_error_text(exc)}"
        else:
            now = time.monotonic() - t0
            out["status_polls"] += 1
            out["status"] = status
            if out["ring_s"] is None and set(status.get("ring", {}).get("members", [])) == set(node_ids):
                out["ring_s"] = now
            handoffs = status.get("handoffs") or 0
            if handoffs and out["first_handoff_s"] is None:
                out["first_handoff_s"] = now
            out["max_handoffs"] = max(out["max_handoffs"], handoffs)
            problem = _rebalance_problem(status, topic, node_ids, replication_factor, partitions, expected)
            if problem is None:
                out["done_s"] = now
                return out
        if time.monotonic() >= deadline:
            out["problem"] = problem
            return out
        time.sleep(REBALANCE_POLL_S)


def _node_bytes(cluster: _Cluster) -> dict[str, int]:
    """Bytes in every node's data directory, by label (``node1``...), including stopped nodes' (0 once deleted)."""
    return {f"node{i + 1}": _dir_bytes(cluster.data_dir(i)) for i in range(cluster.count)}


def _partition_bytes(cluster: _Cluster, topic: str, partitions: int) -> dict[int, int]:
    """Per partition of ``topic``, the size of its largest copy on any node (``<data>/topics/<topic>-<p>/``)."""
    return {p: max(_dir_bytes(os.path.join(cluster.data_dir(i), "topics", f"{topic}-{p}")) for i in range(cluster.count))
            for p in range(partitions)}


def _move_start(cluster: _Cluster, client: Any, topic: str, partitions: int) -> dict[str, Any]:
    """What a move is compared with: placement, node and partition sizes just before it starts."""
    status = client.status(timeout=5.0)
    return {"status": status, "placement": _placement(status, topic), "members": [n for n in cluster.node_ids if n],
            "node_bytes": _node_bytes(cluster), "partition_bytes": _partition_bytes(cluster, topic, partitions)}


def _move_report(out: dict[str, Any], start: dict[str, Any], cluster: _Cluster, topic: str, partitions: int,
                 replication_factor: int, members_after: list[str], waited: dict[str, Any], vnodes: int,
                 receivers: list[str]) -> None:
    """Add to ``out`` what a join or a leave moved, against the ring's prediction for the same membership change.

    ``moved_bytes``: the size, when the move started, of the partitions whose replica set changed
    (each got exactly one new replica); ``received_bytes``: what the ``receivers`` nodes' data
    directories grew by, which also counts records written meanwhile (``--load-rate``)."""
    from meshq.core.ring import HashRing, moved_partitions

    out.update({k: waited[k] for k in ("done_s", "ring_s", "first_handoff_s", "max_handoffs", "status_polls",
                                       "status_failures")})
    before, members_before = start["placement"], start["members"]
    ring_after = HashRing(members_after, vnodes)
    out["members_before"], out["members_after"] = members_before, members_after
    out["predicted_moved"] = moved_partitions(HashRing(members_before, vnodes), ring_after, topic, partitions,
                                              replication_factor)
    after = _placement(waited.get("status", {}), topic)
    out["moved"] = sorted(p for p in after if set(after[p]["replicas"]) != set(before.get(p, {}).get("replicas", [])))
    out["moved_as_predicted"] = out["moved"] == out["predicted_moved"]
    placement = ring_after.placement(topic, partitions, replication_factor)
    out["replicas_in_ring_order"] = sum(1 for p, want in enumerate(placement) if after.get(p, {}).get("replicas") == want)
    out["leaders_at_ring_owner"] = sum(1 for p, want in enumerate(placement) if after.get(p, {}).get("leader") == want[0])
    out["leaders_moved"] = sum(1 for p in after if after[p]["leader"] != before.get(p, {}).get("leader"))
    out["final_placement"] = {str(p): after[p]["replicas"] for p in sorted(after)}
    out["bytes_before"] = start["node_bytes"]
    out["bytes_after"] = _node_bytes(cluster)
    out["moved_bytes"] = sum(start["partition_bytes"].get(p, 0) for p in out["moved"])
    out["received_bytes"] = sum(max(0, out["bytes_after"][label] - start["node_bytes"].get(label, 0))
                                for label in receivers)
    if out["done_s"]:
        out["moved_mb_per_s"] = out["moved_bytes"] / 1e6 / out["done_s"]


def _rebalance_join(client: Any, cluster: _Cluster, topic: str, args: Any, partitions: int,
                    replication_factor: int, vnodes: int) -> dict[str, Any]:
    """Start one more node and time until every partition is where the ring over the bigger membership puts it."""
    from meshq.core.ring import HashRing

    start = _move_start(cluster, client, topic, partitions)
    t0 = time.monotonic()
    index = cluster.add()
    sampler = _CpuSampler({"producer": os.getpid(), **cluster.pids()})
    sampler.start()
    out: dict[str, Any] = {"move": "join", "node": f"node{index + 1}", "t0": t0}
    try:
        cluster._wait_ready(index)
        out["ready_s"] = time.monotonic() - t0
        members_after = start["members"] + [cluster.node_ids[index]]
        out["node_id"] = cluster.node_ids[index]
        expected = dict(enumerate(HashRing(members_after, vnodes).placement(topic, partitions, replication_factor)))
        waited = _wait_rebalanced(client, topic, members_after, replication_factor, partitions, expected, t0,
                                  args.move_timeout)
    finally:
        sampler.stop()
    out["cpu"] = sampler.summary()
    _move_report(out, start, cluster, topic, partitions, replication_factor, members_after, waited, vnodes,
                 receivers=[out["node"]])
    if waited["done_s"] is None:
        out["error"] = (f"the join did not finish within {args.move_timeout:g} s: {waited.get('problem')}"
                        + _node_tails(cluster))
    return out


def _rebalance_leave(client: Any, cluster: _Cluster, topic: str, args: Any, partitions: int,
                     replication_factor: int, vnodes: int) -> dict[str, Any]:
    """``leave`` of one original node that does not lead the metadata log; time until the rest hold everything."""
    from meshq.core.ring import HashRing

    start = _move_start(cluster, client, topic, partitions)
    metadata_leader = start["status"].get("metadata", {}).get("leader")
    candidates = [i for i in range(cluster.count - 1) if cluster.node_ids[i] != metadata_leader]
    index = candidates[0] if candidates else 0
    victim = cluster.node_ids[index]
    child = cluster.children[index]
    assert child is not None
    members_after = [n for n in start["members"] if n != victim]
    expected = dict(enumerate(HashRing(members_after, vnodes).placement(topic, partitions, replication_factor)))
    sampler = _CpuSampler({"producer": os.getpid(), **cluster.pids()})
    t0 = time.monotonic()
    out: dict[str, Any] = {"move": "leave", "node": f"node{index + 1}", "node_id": victim,
                           "was_metadata_leader": victim == metadata_leader, "t0": t0}

    def leave() -> None:  # in a thread: meanwhile status is polled as for a join
        try:
            client.leave(timeout=args.move_timeout, node_id=victim)
            out["leave_returned_s"] = time.monotonic() - t0
        except MeshqError as exc:
            out["leave_error"] = _error_text(exc)

    leaver = threading.Thread(target=leave, name="bench-leave", daemon=True)
    sampler.start()
    leaver.start()
    try:
        waited = _wait_rebalanced(client, topic, members_after, replication_factor, partitions, expected, t0,
                                  args.move_timeout)
        leaver.join(max(1.0, t0 + args.move_timeout - time.monotonic()))
        try:
            child.proc.wait(max(1.0, t0 + args.move_timeout - time.monotonic()))
            out["process_exit_s"] = time.monotonic() - t0
            out["process_exit_code"] = child.proc.returncode
        except subprocess.TimeoutExpired:
            out["process_exit_s"] = None
    finally:
        sampler.stop()
    out["cpu"] = sampler.summary()
    _move_report(out, start, cluster, topic, partitions, replication_factor, members_after, waited, vnodes,
                 receivers=[f"node{i + 1}" for i in range(cluster.count) if i != index])
    problems = []
    if "leave_error" in out:
        problems.append(f"leave failed: {out['leave_error']}")
    if waited["done_s"] is None:
        problems.append(f"the leave did not finish within {args.move_timeout:g} s: {waited.get('problem')}")
    elif out.get("process_exit_s") is None:
        problems.append(f"the leaving node (pid {child.pid}) did not exit by itself")
    if problems:
        out["error"] = "; ".join(problems) + _node_tails(cluster)
    return out


def _run_rebalance_cluster(args: Any, workdir: str, load_rate: int | None, with_load: bool) -> dict[str, Any]:
    """Preload ``--nodes`` nodes, then a join (and a leave, if this meshq has one), optionally under load."""

    partitions = REBALANCE_PARTITIONS
    replication_factor = min(args.replication_factor, args.nodes)
    cluster = _Cluster(args.nodes, workdir, args, replication_factor)
    client: Any = None
    writer: _LoadWriter | None = None
    out: dict[str, Any] = {"nodes": args.nodes, "replication_factor": replication_factor, "partitions": partitions,
                           "fsync": args.fsync}
    try:
        client = _start_with_client(args, cluster, out)
        topic = f"bench-{uuid.uuid4().hex[:8]}-rebalance"
        out["topic"] = topic
        client.create_topic(topic, partitions=partitions, replication_factor=replication_factor, retention_ms=None)
        status, problem = _wait_cluster(client, topic, cluster, CLUSTER_READY_TIMEOUT_S, False, partitions)
        if status is None:
            raise BenchError(f"the cluster did not get ready for {topic}: {problem}")
        vnodes = status.get("ring", {}).get("vnodes") or 256
        values = _values(args.batch, args.value_bytes)

        _progress(f"preloading {args.records:,} records (acks=quorum)")
        preload = _pipelined_batch(client, topic, args.records, values, "quorum",
                                   _CpuSampler({"producer": os.getpid(), **cluster.pids()}), repeats=1,
                                   limit_s=max(PHASE_TIMEOUT_S, args.records / 10_000))
        out["preload"] = preload
        acknowledged = preload["acknowledged"]
        stored = _wait_high_watermarks(client, topic, acknowledged, 30.0)
        status, problem = _wait_cluster(client, topic, cluster, args.move_timeout, True, partitions)
        if status is None:
            raise BenchError(f"the replicas did not get in sync after the preload: {problem}")
        out["preload"]["high_watermark_sum"] = stored
        out["bytes_after_preload"] = _node_bytes(cluster)

        if with_load:
            writer = _LoadWriter(client, topic, values[:LOAD_BATCH], "quorum", load_rate)
            writer.start()
            time.sleep(LOAD_BEFORE_S)
        _progress(f"join: starting node{cluster.count + 1}")
        join = _rebalance_join(client, cluster, topic, args, partitions, replication_factor, vnodes)
        out["join"] = join
        if writer is not None:
            join["load_before"] = writer.window(join["t0"] - LOAD_BEFORE_S, join["t0"])
            join["load_during"] = writer.window(join["t0"], join["t0"] + (join["done_s"] or 0.0))
        del join["t0"]
        if "error" in join:
            return out

        if args.skip_leave:
            out["leave"] = {"skipped": "--skip-leave"}
        elif not callable(getattr(client, "leave", None)):
            out["leave"] = {"skipped": "this meshq has no leave (Node.leave / meshq leave)"}
        else:
            time.sleep(LOAD_BEFORE_S if writer is not None else 1.0)  # leadership settles on the ring owners
            _progress("leave: one of the original nodes leaves")
            leave = _rebalance_leave(client, cluster, topic, args, partitions, replication_factor, vnodes)
            out["leave"] = leave
            if writer is not None:
                leave["load_before"] = writer.window(leave["t0"] - LOAD_BEFORE_S, leave["t0"])
                leave["load_during"] = writer.window(leave["t0"], leave["t0"] + (leave["done_s"] or 0.0))
            del leave["t0"]

        if writer is not None:
            writer.stop()
            load_acknowledged, load_unknown = writer.totals()
            out["load"] = {"rate": load_rate, "acks": "quorum", "batch": len(writer.values), "window_batches": LOAD_WINDOW,
                           "acknowledged": load_acknowledged, "failed_records": load_unknown,
                           "error": writer.error}
            writer = None
        else:
            load_acknowledged = load_unknown = 0
        expected_records = acknowledged + load_acknowledged
        stored = _wait_high_watermarks(client, topic, expected_records, 30.0)
        out["verification"] = {"acknowledged": expected_records, "unknown_fate": load_unknown,
                               "high_watermark_sum": stored,
                               "ok": expected_records <= stored <= expected_records + load_unknown}
        return out
    except (BenchError, MeshqError) as exc:  # keep what was measured before the failure
        out["error"] = _error_text(exc)
        return out
    finally:
        out["node_pids"] = cluster.launched_pids
        try:
            if writer is not None:
                writer.stop()
        finally:
            try:
                if client is not None:
                    client.stop()
            finally:
                cluster.stop()
