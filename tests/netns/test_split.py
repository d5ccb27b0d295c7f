"""A 2|1 network split between "hosts" (Linux network namespaces on one bridge) while both sides write (SPEC §5).

Three nodes, a topic of 3 partitions with replication factor 3. A writer process runs inside the majority side
(one of the two connected hosts) and another inside the minority host; each produces unique values with
``acks="quorum"`` into every partition and reports every attempt. The minority host is the leader of partition 0,
so the majority side has to fail over. Its cable is pulled (the bridge port goes down: both processes on it keep
running), for at least 15 s, then plugged back.

Checks:
- the minority acknowledges NO write that started after the split (each such attempt raises a ``MeshqError`` such
  as ``NotEnoughReplicasError`` or ``TimeoutError``), and it did keep trying;
- the majority acknowledges writes in every partition during the split;
- after the heal: every replica back in sync, both writers acknowledged again; a consumer drains every partition up
  to its high watermark: lost = 0, unexpected = 0 (duplicates reported), per-partition order kept;
- the nodes stop cleanly and every replica's log is byte-identical up to the high watermark.

Skipped unless root with iproute2; every namespace, process and file is removed afterwards (``lab`` fixture).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

import meshq
from tests.multinode.helpers import (
    check_logs_hold_records,
    check_replicas_identical,
    check_writes,
    partitions_of,
    wait_until,
)
from tests.netns.lab import Host, Lab, NsNode, can_use_netns, ip

pytestmark = pytest.mark.skipif(not can_use_netns(),
                                reason="network-namespace tests need root and iproute2 (ip netns)")

TOPIC = "ns-split"
PARTITIONS = 3


def views_of(lab: Lab, nodes: list[NsNode], from_host: Host | None = None) -> dict[str, dict] | None:
    """{node_id: own status} of every node in ``nodes`` (asked from ``from_host``), or None if one does not answer."""
    answers = lab.probe(from_host or nodes[0].host, nodes)
    if any(v is None for v in answers.values()):
        return None
    return {v["node_id"]: v for v in answers.values()}


def agreed(lab: Lab, nodes: list[NsNode]) -> bool:
    """Every node of ``nodes`` sees exactly these as voters, all alive, and the same metadata leader."""
    views = views_of(lab, nodes)
    if views is None:
        return False
    expected = {n.node_id for n in nodes}
    leaders = set()
    for status in views.values():
        states = {m["node_id"]: m["state"] for m in status["members"]}
        if set(status["metadata"]["voters"]) != expected or any(states.get(i) != "alive" for i in expected):
            return False
        leaders.add(status["metadata"]["leader"])
    return len(leaders) == 1 and None not in leaders


def replication_state(lab: Lab) -> dict[int, dict] | None:
    """Each partition as its leader reports it, once all nodes name the same leader and it has all 3 in sync."""
    views = views_of(lab, lab.nodes)
    if views is None:
        return None
    parts = {nid: partitions_of(status, TOPIC) for nid, status in views.items()}
    if any(len(p) != PARTITIONS for p in parts.values()):
        return None
    state = {}
    for partition in range(PARTITIONS):
        leaders = {p[partition]["leader"] for p in parts.values()}
        if len(leaders) != 1 or None in leaders or next(iter(leaders)) not in parts:
            return None
        mine = parts[next(iter(leaders))][partition]
        if len(mine["replicas"]) != 3 or set(mine["in_sync"]) != set(mine["replicas"]):
            return None
        state[partition] = mine
    return state


def describe(lab: Lab, nodes: list[NsNode] | None = None) -> str:
    lines = []
    nodes = nodes or lab.nodes
    for seed, status in lab.probe(nodes[0].host, nodes).items():
        if status is None:
            lines.append(f"{seed}: no answer")
            continue
        parts = partitions_of(status, TOPIC)
        lines.append(f"{status['node_id']} @ {seed}: metadata leader {status['metadata'].get('leader')}; " + ", ".join(
            f"p{p}: leader={d['leader']} epoch={d.get('epoch', '?')} in_sync={d['in_sync']} hw={d['high_watermark']}"
            for p, d in sorted(parts.items())))
    return "\n".join(lines)


def wait_for(condition, timeout_s: float, what: str, lab: Lab, interval_s: float = 0.3):
    return wait_until(condition, timeout_s, what, interval_s, detail=lambda: describe(lab))


def wait_settled(lab: Lab, timeout_s: float, minimum: dict[int, int]) -> dict[int, dict]:
    """Replication settled, high watermarks >= ``minimum`` and unchanged over two polls."""
    previous: list[dict[int, int] | None] = [None]

    def settled():
        state = replication_state(lab)
        if state is None:
            previous[0] = None
            return None
        marks = {p: d["high_watermark"] for p, d in state.items()}
        stable = marks == previous[0] and all(marks[p] >= m for p, m in minimum.items())
        previous[0] = marks
        return state if stable else None

    return wait_for(settled, timeout_s, f"every replica in sync with high watermarks >= {minimum}", lab, 0.5)


def consume_all(lab: Lab, host: Host, node: NsNode) -> list[meshq.Record]:
    result = host.meshq("consume", TOPIC, "--json", "--from", "earliest", "--timeout", "6", "--seed", node.seed,
                        "--cluster", lab.cluster, "--no-mdns", timeout_s=180)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    records = []
    for line in result.stdout.decode().splitlines():
        r = json.loads(line)
        value = r["value"].encode() if "value" in r else base64.b64decode(r["value_b64"])
        records.append(meshq.Record(r["topic"], r["partition"], r["offset"], None, value))
    return records


@pytest.mark.timeout(420)
def test_split_2_1_minority_acknowledges_no_quorum_write_and_heal_loses_nothing(lab, timings):
    for host in lab.hosts:  # no seeds: mDNS across the bridge introduces them (as in test_lan.py)
        lab.start_node(host)
    wait_for(lambda: agreed(lab, lab.nodes), 60, "one agreed membership of 3", lab)
    created = lab.hosts[0].meshq("topics", "create", TOPIC, "--partitions", str(PARTITIONS),
                                 "--replication-factor", "3", "--seed", lab.nodes[0].seed, "--cluster", lab.cluster,
                                 "--no-mdns")
    assert created.returncode == 0, created.stderr.decode()
    state = wait_settled(lab, 45, {})
    cut = next(n for n in lab.nodes if n.node_id == state[0]["leader"])  # the minority leads partition 0
    majority = [n for n in lab.nodes if n is not cut]
    major_writer = lab.start_writer(majority[0].host, "major", TOPIC, PARTITIONS)
    minor_writer = lab.start_writer(cut.host, "minor", TOPIC, PARTITIONS)
    writers = [major_writer, minor_writer]
    for writer in writers:
        writer.wait_ready(45)

    def acks_everywhere(since_s: float, who: list) -> bool:
        return all(w.log.acks_since(since_s, p) >= 5 for w in who for p in range(PARTITIONS))

    wait_for(lambda: acks_everywhere(0.0, writers), 45, "both writers acknowledged in every partition", lab)

    port = f"p{cut.host.index}"
    ip("-n", lab.bridge_netns, "link", "set", port, "down")  # cable pulled: its node and writer keep running
    cut_s = time.monotonic()
    try:
        wait_for(lambda: acks_everywhere(cut_s, [major_writer]), 60,
                 "the majority side to acknowledge writes in every partition during the split", lab)
        timings("netns split 2|1: cut -> majority acknowledges in every partition", time.monotonic() - cut_s)
        time.sleep(max(0.0, 15 - (time.monotonic() - cut_s)))  # the minority keeps trying for a while
        split_views = lab.probe(cut.host, [cut])
    finally:
        ip("-n", lab.bridge_netns, "link", "set", port, "up")
    healed_s = time.monotonic()

    minority_after = [a for a in minor_writer.log.snapshot() if a.started_s >= cut_s and a.started_s < healed_s]
    minority_acked = [a for a in minority_after if a.ok]
    assert minority_after, "the minority writer made no attempt during the split"
    assert not minority_acked, (
        f"the minority side acknowledged {len(minority_acked)} quorum writes started after the split, e.g. "
        f"{[a.to_json() for a in minority_acked[:5]]}\nminority view during the split: "
        f"{json.dumps({k: partitions_of(v, TOPIC) if v else None for k, v in split_views.items()})}")
    minority_errors: dict[str, int] = {}
    for a in minority_after:
        minority_errors[a.error_type or "ok"] = minority_errors.get(a.error_type or "ok", 0) + 1

    wait_for(lambda: agreed(lab, lab.nodes), 60, "one agreed membership of 3 after the heal", lab)
    wait_for(lambda: replication_state(lab), 90, "every replica in sync after the heal", lab)
    timings("netns split 2|1: link back up -> every replica in sync, one leader per partition everywhere",
            time.monotonic() - healed_s)
    wait_for(lambda: acks_everywhere(healed_s, writers), 90,
             "both writers (the former minority too) acknowledged in every partition after the heal", lab)
    reports = [w.stop() for w in writers]
    attempts = [a for w in writers for a in w.log.snapshot()]
    produced = set().union(*(w.log.produced for w in writers))
    acked_end: dict[int, int] = {}
    for a in attempts:
        if a.ok:
            acked_end[a.partition] = max(acked_end.get(a.partition, 0), a.offset + 1)
    state = wait_settled(lab, 60, acked_end)
    high_watermarks = {p: d["high_watermark"] for p, d in state.items()}
    records = consume_all(lab, majority[1].host, majority[1])
    check = check_writes(attempts, produced, records, high_watermarks)
    problems = check.problems()
    stopped = {n.node_id: n.stop() for n in lab.nodes}  # SIGTERM: a clean stop flushes and exits 0
    problems += [f"node {nid} did not stop cleanly: {result}" for nid, result in stopped.items() if not result.clean]
    logs, replica_problems = check_replicas_identical({n.node_id: n.data_dir for n in lab.nodes}, TOPIC, state)
    problems += replica_problems + check_logs_hold_records(logs, TOPIC, records, high_watermarks)
    print(f"SUMMARY netns split 2|1 (minority {cut.node_id}): {check.summary()} high_watermarks={high_watermarks} "
          f"minority attempts during the split: {minority_errors} writer reports: {reports}")
    if check.duplicate_examples:
        print(f"duplicates (re-sent after an error), e.g. {check.duplicate_examples}")
    if check.stored_despite_error:
        print(f"NOTE a call that raised an error other than TimeoutError/NotEnoughReplicasError stored its record "
              f"({len(check.stored_despite_error)} values), e.g. {check.stored_despite_error[:3]}")
    if check.errors_beyond_the_contract():
        print(f"NOTE writers saw errors other than NotEnoughReplicasError/TimeoutError: "
              f"{check.errors_beyond_the_contract()}")
    assert not problems, "\n".join(problems)
