"""meshq between "hosts" (Linux network namespaces on one bridge): real multicast mDNS, real TCP.

SPEC §1 (discovery by mDNS, one instance per node), §3.5 (agreed membership), §6
(multi-host tests in network namespaces when run as root; mDNS pinned to the namespace
interfaces, no traffic beyond them). Skipped unless root with iproute2.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.netns.lab import Host, Lab, NsNode, can_use_netns, ip, netns_names

pytestmark = pytest.mark.skipif(not can_use_netns(),
                                reason="network-namespace tests need root and iproute2 (ip netns)")


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def agreement(lab: Lab, nodes: list[NsNode] | None = None, from_host: Host | None = None) -> dict[str, dict] | None:
    """Each node's own view, once they agree: voters are exactly these nodes, one leader, all alive."""
    nodes = lab.nodes if nodes is None else nodes
    expected = {n.node_id for n in nodes}
    views = lab.probe(from_host or nodes[0].host, nodes)
    if any(v is None for v in views.values()):
        return None
    leaders = set()
    for status in views.values():
        meta = status["metadata"]
        if set(meta["voters"]) != expected or any(states(status).get(i) != "alive" for i in expected):
            return None
        leaders.add(meta["leader"])
    if len(leaders) != 1 or None in leaders:
        return None
    return {v["node_id"]: v for v in views.values()}


def states(status: dict) -> dict[str, str]:
    return {m["node_id"]: m["state"] for m in status["members"]}


def wait_agreement(lab: Lab, timeout_s: float, nodes: list[NsNode] | None = None) -> dict[str, dict]:
    nodes = lab.nodes if nodes is None else nodes
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = agreement(lab, nodes)
        if views is not None:
            return views
        time.sleep(0.3)
    last = lab.probe(nodes[0].host, nodes)
    summary = {seed: (v["metadata"], sorted(states(v).items())) if v else None for seed, v in last.items()}
    raise AssertionError(f"no agreed membership within {timeout_s} s: {json.dumps(summary, indent=1)}")


def wait_states(lab: Lab, observers: list[NsNode], subject: NsNode, state: str, since: float,
                timeout_s: float) -> dict[str, float]:
    """Seconds (from ``since``) until each observer's own view shows ``subject`` in ``state``."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(observers) and time.monotonic() < deadline:
        for observer in observers:
            if observer.node_id in seen:
                continue
            status = lab.probe(observer.host, [observer])[observer.seed]
            if status is not None and states(status).get(subject.node_id) == state:
                seen[observer.node_id] = time.monotonic() - since
        time.sleep(0.1)
    return seen


def start_nodes(lab: Lab) -> None:
    for host in lab.hosts:  # no seeds anywhere: mDNS across the bridge is the only introduction
        node = lab.start_node(host)
        # `ip netns exec` execs the command: the PID we hold is the node's own, inside that namespace.
        pid = node.process.pid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"meshq" in argv and b"node" in argv, argv
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode(host.netns)


@pytest.mark.timeout(120)
def test_three_hosts_discover_each_other_by_multicast_mdns_and_agree(lab, timings):
    started = time.monotonic()
    start_nodes(lab)
    views = wait_agreement(lab, timeout_s=45)
    timings("netns: mDNS across the bridge -> 3 hosts agree on membership (from launch)",
            time.monotonic() - started)
    expected = {n.node_id for n in lab.nodes}
    for status in views.values():
        assert sorted(status["metadata"]["voters"]) == sorted(expected)
        addresses = {m["node_id"]: m["address"] for m in status["members"]}
        for node in lab.nodes:  # every peer is reached at its own namespace address, never loopback
            assert addresses[node.node_id] == f"tcp://{node.seed}"


@pytest.mark.timeout(150)
def test_produce_in_one_namespace_consume_in_another(lab):
    start_nodes(lab)
    wait_agreement(lab, timeout_s=45)
    first, _, last = lab.hosts
    first_node, _, last_node = lab.nodes
    lines = [f"ns-record-{i:04d}" for i in range(300)]
    connect = ["--cluster", lab.cluster, "--no-mdns"]
    # acks=leader: this release does not replicate yet and refuses acks=quorum (see tests/multinode/test_data.py)
    produced = first.meshq("produce", "ns-orders", "--json", "--acks", "leader", "--timeout", "20",
                           "--seed", first_node.seed, *connect,
                           input_bytes="\n".join(lines).encode() + b"\n")
    assert produced.returncode == 0, produced.stderr.decode()
    acks = [json.loads(line) for line in produced.stdout.decode().splitlines()]
    assert len(acks) == len(lines)
    consumed = last.meshq("consume", "ns-orders", "--json", "--from", "earliest", "--timeout", "4",
                          "--seed", last_node.seed, *connect)
    assert consumed.returncode == 0, consumed.stderr.decode()
    records = [json.loads(line) for line in consumed.stdout.decode().splitlines()]
    by_position = {(r["partition"], r["offset"]): r["value"] for r in records}
    assert len(by_position) == len(records) == len(lines), "every record exactly once"
    for line, ack in zip(lines, acks):
        assert by_position[(ack["partition"], ack["offset"])] == line
    per_partition: dict[int, list[int]] = {}
    for r in records:
        per_partition.setdefault(r["partition"], []).append(r["offset"])
    for partition, offsets in per_partition.items():
        assert offsets == list(range(len(offsets))), f"partition {partition}: gap or reorder"
    # the records sit on several hosts: the leaders of the topic's partitions span namespaces
    views = lab.probe(last, lab.nodes)
    topic = next(t for t in views[last_node.seed]["topics"] if t["name"] == "ns-orders")
    assert len({p["leader"] for p in topic["partitions"]}) >= 2


@pytest.mark.timeout(150)
def test_a_cut_off_host_is_seen_dead_and_rejoins_when_its_link_comes_back(lab, timings):
    start_nodes(lab)
    wait_agreement(lab, timeout_s=45)
    cut = lab.nodes[2]
    others = lab.nodes[:2]
    port = f"p{cut.host.index}"
    cut_at = time.monotonic()
    ip("-n", lab.bridge_netns, "link", "set", port, "down")  # its cable is pulled: the process keeps running
    seen = wait_states(lab, others, cut, "dead", cut_at, timeout_s=15)
    for observer, seconds in sorted(seen.items()):
        timings(f"netns: link down -> {observer} sees the cut-off host dead", seconds)
    assert len(seen) == len(others), f"not every connected host saw the cut-off one dead: {seen}"
    assert max(seen.values()) <= 6.0, f"failure detection took {seen} s (failure timeout 3 s)"
    cut_view = lab.probe(cut.host, [cut])[cut.seed]
    assert cut_view is not None and all(states(cut_view)[o.node_id] in ("suspect", "dead") for o in others)
    # the two connected hosts are a majority of the voters: they (still, or newly) agree on a leader among them
    views = lab.probe(others[0].host, others)
    leaders = {v["metadata"]["leader"] for v in views.values() if v}
    deadline = time.monotonic() + 15
    while (len(leaders) != 1 or cut.node_id in leaders or None in leaders) and time.monotonic() < deadline:
        time.sleep(0.3)
        leaders = {v["metadata"]["leader"] for v in lab.probe(others[0].host, others).values() if v}
    assert len(leaders) == 1 and cut.node_id not in leaders and None not in leaders, leaders

    healed_at = time.monotonic()
    ip("-n", lab.bridge_netns, "link", "set", port, "up")
    wait_agreement(lab, timeout_s=30)
    timings("netns: link back up -> all 3 hosts alive and agreed again", time.monotonic() - healed_at)


@pytest.mark.timeout(150)
def test_a_host_that_booted_cut_off_joins_the_cluster_when_its_link_comes_back(lab, timings):
    cut_host = lab.hosts[2]
    port = f"p{cut_host.index}"
    ip("-n", lab.bridge_netns, "link", "set", port, "down")  # booted while its switch port was down
    start_nodes(lab)
    first_two, cut = lab.nodes[:2], lab.nodes[2]
    try:
        wait_agreement(lab, timeout_s=30, nodes=first_two)
        wait_agreement(lab, timeout_s=30, nodes=[cut])  # alone, it formed a one-member cluster of the same name
    except AssertionError as exc:
        pytest.fail(f"precondition: {exc}")  # not the expected failure
    healed_at = time.monotonic()
    ip("-n", lab.bridge_netns, "link", "set", port, "up")
    wait_agreement(lab, timeout_s=20)
    timings("netns: late link -> one membership of 3", time.monotonic() - healed_at)


@pytest.mark.timeout(90)
def test_teardown_leaves_no_namespace_process_or_file_behind():
    lab = Lab()
    try:
        lab.build()
        assert set(lab.netns) <= netns_names()
        node = lab.start_node(lab.hosts[0])
        pid = node.process.pid
    finally:
        lab.teardown()
    assert not set(lab.netns) & netns_names(), f"left behind: {set(lab.netns) & netns_names()}"
    assert not os.path.exists(f"/proc/{pid}") or _pid_reused_by_another_program(pid), "the node survived teardown"
    assert not os.path.exists(lab.root)
    assert not any(name.endswith(lab.tag) for name in netns_names())


def _pid_reused_by_another_program(pid: int) -> bool:
    """True when /proc/<pid> now belongs to some other program (the PID was reused), not to our node."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"meshq" not in f.read()
    except OSError:
        return True
