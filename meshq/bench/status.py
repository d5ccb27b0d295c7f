"""Reading a cluster from ``client.status()``: a topic's partitions, its stored records, and waits until it is ready.

Theory of operation
-------------------
A measurement on a topic starts only once the cluster is healthy for it: every member alive,
every partition with a live leader and ``replication_factor`` replicas and, when asked, every
replica in sync (``_health_problem`` says what is still missing). The waits poll status every
0.1 s until then or a deadline and return or raise the last problem seen, so the report says
why a part was not measured. ``_high_watermarks`` sums high watermarks: the check that the
nodes stored every acknowledged record.
"""

from __future__ import annotations

import time
from typing import Any

from meshq.bench.console import _progress
from meshq.bench.errors import BenchError, _error_text
from meshq.bench.procs import PARTITIONS, READY_TIMEOUT_S, _Cluster
from meshq.errors import MeshqError

CLUSTER_READY_TIMEOUT_S = 60.0  # members alive and every partition led, after a start or a restart


def _high_watermarks(client: Any, topics: set[str]) -> int:
    status = client.status(timeout=10.0)
    total = 0
    for topic in status["topics"]:
        if topic["name"] in topics:
            total += sum(p["high_watermark"] for p in topic["partitions"])
    return total


def _topic_partitions(status: dict, topic: str) -> list[dict]:
    for entry in status.get("topics", []):
        if entry["name"] == topic:
            return entry["partitions"]
    return []


def _health_problem(status: dict, topic: str, node_ids: list[str], replication_factor: int,
                    need_in_sync: bool, partitions_expected: int = PARTITIONS) -> str | None:
    """Why the cluster is not ready for a measurement on ``topic``, or None when it is."""
    states = {m["node_id"]: m["state"] for m in status.get("members", [])}
    down = [n for n in node_ids if states.get(n) != "alive"]
    if down:
        return "members not alive: " + ", ".join(f"{n} ({states.get(n, 'unknown')})" for n in down)
    partitions = _topic_partitions(status, topic)
    if len(partitions) != partitions_expected:
        return f"status shows {len(partitions)} of {partitions_expected} partitions of {topic}"
    for p in partitions:
        if p["leader"] is None or states.get(p["leader"]) != "alive":
            return f"partition {p['partition']} has no live leader ({p['leader']})"
        if len(p["replicas"]) != replication_factor:
            return f"partition {p['partition']} has {len(p['replicas'])} replicas, not {replication_factor}"
        if need_in_sync and p["in_sync"] is None:
            return f"partition {p['partition']}: in-sync set unknown (its leader {p['leader']} did not answer)"
        if need_in_sync and set(p["in_sync"]) != set(p["replicas"]):
            return (f"partition {p['partition']}: in sync {len(p['in_sync'])} of {len(p['replicas'])} replicas "
                    f"({', '.join(p['in_sync'])})")
    return None


def _wait_cluster(client: Any, topic: str, cluster: _Cluster, timeout_s: float,
                  need_in_sync: bool, partitions: int = PARTITIONS) -> tuple[dict | None, str | None]:
    """Poll status until the cluster is ready (see ``_health_problem``); returns (status, None) or (None, why not)."""
    deadline = time.monotonic() + timeout_s
    problem = "no status answer"
    while True:
        try:
            status = client.status(timeout=2.0)
            problem = _health_problem(status, topic, cluster.node_ids, cluster.replication_factor, need_in_sync,
                                      partitions)
            if problem is None:
                return status, None
        except MeshqError as exc:
            problem = f"status failed: {_error_text(exc)}"
        if time.monotonic() >= deadline:
            return None, problem
        time.sleep(0.1)


def _wait_agreed(client: Any, cluster: _Cluster, timeout_s: float) -> None:
    """Wait until the agreed storage membership (the ring) is exactly the cluster's nodes, all alive."""
    deadline = time.monotonic() + timeout_s
    problem = "no status answer"
    expected = set(cluster.node_ids)
    while True:
        try:
            status = client.status(timeout=2.0)
            ring = set(status.get("ring", {}).get("members", []))
            states = {m["node_id"]: m["state"] for m in status.get("members", [])}
            if ring != expected:
                problem = f"ring members {sorted(ring)}, expected {sorted(expected)}"
            elif any(states.get(n) != "alive" for n in expected):
                problem = f"member states {states}"
            else:
                return
        except MeshqError as exc:
            problem = f"status failed: {_error_text(exc)}"
        if time.monotonic() >= deadline:
            raise BenchError(f"the {cluster.count} nodes did not agree on the membership within {timeout_s:.0f} s: "
                             f"{problem}")
        time.sleep(0.1)


def _wait_high_watermarks(client: Any, topic: str, expected: int, timeout_s: float) -> int:
    """The sum of ``topic``'s high watermarks once it reaches ``expected`` (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    stored = -1
    while True:
        try:
            stored = _high_watermarks(client, {topic})
        except MeshqError:
            pass
        if stored >= expected or time.monotonic() >= deadline:
            return stored
        time.sleep(0.1)


def _start_with_client(args: Any, cluster: _Cluster, out: dict[str, Any]) -> Any:
    """Start the cluster's nodes and a client node seeded with them; return the client once the
    nodes agree on the membership (the client is returned started: the caller stops it)."""
    from meshq.node import Node

    _progress(f"starting {args.nodes} nodes")
    cluster.start()
    out["node_ids"] = list(cluster.node_ids)
    client = Node(cluster=args.cluster, seeds=cluster.seeds, mdns=False, role="client")
    client.start()
    client.wait_ready(timeout=READY_TIMEOUT_S)
    _wait_agreed(client, cluster, CLUSTER_READY_TIMEOUT_S)
    return client
