"""``meshq bench replication``'s cluster: throughput and latency on ``--nodes`` replicated nodes, then failover.

Theory of operation
-------------------
(run.py measures the baseline and the single node first: ``produce_batch`` and synchronous
``produce``, replication factor 1, ``acks=leader``; no ``produce_async``.) Here: ``--nodes`` (3)
``meshq node`` children on 127.0.0.1 (mDNS off, fixed ports; the first forms the cluster, the
others join through it as a seed), and once the agreed membership (the ring) holds all of them,
per acks level ``leader`` then ``quorum``: a topic of 8 partitions with
``--replication-factor`` (3) replicas, a wait (at most ``--in-sync-timeout``) until every
replica is in sync, then the pipelined ``produce_batch`` run, the synchronous run (with each
process's CPU µs per request), the synchronous run again on partition 0 only (so its leader's
and its followers' CPU per request show apart), ``produce_async`` in a tight loop alternating round by round with
``produce_batch`` (``_batch_vs_async``: their ratio, issue #18 item 3), and the check that the high watermarks add up to the acknowledged records. A failure (for instance
``NotEnoughReplicasError`` at ``acks=quorum``) is recorded and the run goes on. Last, the
failovers (failover.py) on a fresh topic.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from meshq.bench.console import _progress
from meshq.bench.cpu import _CpuSampler
from meshq.bench.errors import BenchError, _error_text
from meshq.bench.failover import _run_failover
from meshq.bench.procs import PARTITIONS, _Cluster
from meshq.bench.produce import _batch_vs_async, _pipelined_batch, _synchronous, _values
from meshq.bench.status import (
    CLUSTER_READY_TIMEOUT_S,
    _start_with_client,
    _topic_partitions,
    _wait_cluster,
    _wait_high_watermarks,
)
from meshq.errors import MeshqError


def _cluster_phase(client: Any, topic: str, acks: str, args: Any, values: list[bytes],
                   processes: dict[str, int], leader0: str | None = None) -> dict[str, Any]:
    """Pipelined ``produce_batch`` and synchronous ``produce`` at one acks level; a failure is recorded, not raised."""
    out: dict[str, Any] = {"acks": acks, "topic": topic}
    try:
        out["produce_batch"] = _pipelined_batch(client, topic, args.records, values, acks, _CpuSampler(processes))
    except (MeshqError, BenchError, TimeoutError) as exc:
        out["produce_batch"] = {"error": _error_text(exc)}
    if args.sync_records > 0:
        try:
            out["produce"] = _synchronous(client, topic, args.sync_records, values, acks, _CpuSampler(processes))
        except (MeshqError, BenchError, TimeoutError) as exc:
            out["produce"] = {"error": _error_text(exc)}
    if args.sync_records > 0 and leader0 is not None:
        # partition 0 only: its leader's and its followers' CPU per request apart (issue #18 item 1)
        try:
            one = _synchronous(client, topic, args.sync_records, values, acks, _CpuSampler(processes), partition=0)
            one["leader"] = leader0
            out["produce_partition0"] = one
        except (MeshqError, BenchError, TimeoutError) as exc:
            out["produce_partition0"] = {"error": _error_text(exc)}
    try:
        out["batch_vs_async"] = _batch_vs_async(client, topic, args.records, values, acks, processes)
    except (MeshqError, BenchError, TimeoutError) as exc:
        out["batch_vs_async"] = {"error": _error_text(exc)}
    parts = [out[k] for k in ("produce_batch", "produce", "produce_partition0", "batch_vs_async") if k in out]
    if all("error" not in part for part in parts):
        acknowledged = sum(part["acknowledged"] for part in parts)
        stored = _wait_high_watermarks(client, topic, acknowledged, 15.0)
        out["verification"] = {"acknowledged": acknowledged, "high_watermark_sum": stored,
                               "ok": stored == acknowledged}
    return out


def _run_cluster(args: Any, workdir: str) -> dict[str, Any]:
    """The replicated part of ``bench replication``: throughput, latency and failover on ``--nodes`` nodes."""

    replication_factor = min(args.replication_factor, args.nodes)
    cluster = _Cluster(args.nodes, workdir, args, replication_factor)
    client: Any = None
    out: dict[str, Any] = {"nodes": args.nodes, "replication_factor": replication_factor, "partitions": PARTITIONS,
                           "fsync": args.fsync}
    try:
        client = _start_with_client(args, cluster, out)
        run_id = uuid.uuid4().hex[:8]
        values = _values(args.batch, args.value_bytes)
        out["acks"] = {}
        for acks in ("leader", "quorum"):
            topic = f"bench-{run_id}-rf{replication_factor}-{acks}"
            client.create_topic(topic, partitions=PARTITIONS, replication_factor=replication_factor, retention_ms=None)
            status, problem = _wait_cluster(client, topic, cluster, CLUSTER_READY_TIMEOUT_S, need_in_sync=False)
            if status is None:
                raise BenchError(f"the cluster did not get ready for {topic}: {problem}")
            _status, in_sync_problem = _wait_cluster(client, topic, cluster, args.in_sync_timeout, need_in_sync=True)
            processes = {"producer": os.getpid(), **cluster.pids()}
            _progress(f"{args.nodes} nodes, replication factor {replication_factor}, acks={acks}")
            leaders = [p["leader"] for p in _topic_partitions(_status or status, topic) if p["partition"] == 0]
            leader0 = (f"node{cluster.node_ids.index(leaders[0]) + 1}"
                       if leaders and leaders[0] in cluster.node_ids else None)
            phase = _cluster_phase(client, topic, acks, args, values, processes, leader0)
            phase["in_sync_before"] = in_sync_problem is None
            if in_sync_problem is not None:
                phase["in_sync_problem"] = in_sync_problem
            out["acks"][acks] = phase
        if args.failover_repeats > 0:
            topic = f"bench-{run_id}-failover"
            client.create_topic(topic, partitions=PARTITIONS, replication_factor=replication_factor, retention_ms=None)
            out["failover"] = _run_failover(client, cluster, topic, args)
        return out
    except (BenchError, MeshqError) as exc:  # keep what was measured before the failure
        out["error"] = _error_text(exc)
        return out
    finally:
        out["node_pids"] = cluster.launched_pids
        try:
            if client is not None:
                client.stop()
        finally:
            cluster.stop()
