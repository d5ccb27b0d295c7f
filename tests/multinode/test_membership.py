"""Membership of real `meshq node` processes on 127.0.0.1 (SPEC §1 discovery, §2 cluster, §3.5).

Each node is asked for its *own* view (``tests.multinode.probe``): the merged view of
``meshq status`` would hide a node that disagrees.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.multinode.helpers import describe, member_states, node_id, view, wait_agreement, wait_until
from tests.procs import run_cli

FAILURE_TIMEOUT_S = 3.0  # the nodes' default failure_timeout_s (SPEC §3.5: "about 3 s on a LAN")
DETECTION_BOUND_S = 5.0  # failure_timeout_s + 1 s of heartbeat/poll granularity, + 1 s for a noisy 2-core host


@pytest.mark.timeout(90)
def test_three_nodes_discovered_by_mdns_on_loopback_agree_on_one_membership(mesh, timings):
    started = time.monotonic()
    nodes = mesh.start(3, mdns=True)  # all at once, no seeds: discovery by mDNS pinned to 127.0.0.1 only
    views = wait_agreement(nodes, timeout_s=30)
    timings("mDNS discovery -> 3 nodes agree on membership (from launch)", time.monotonic() - started)
    ids = {node_id(n) for n in nodes}
    assert set(views) == ids
    for status in views.values():
        assert sorted(status["metadata"]["voters"]) == sorted(ids)
        assert status["cluster"] == mesh.cluster
    assert len({v["metadata"]["leader"] for v in views.values()}) == 1
    assert len({v["metadata"]["term"] for v in views.values()}) == 1, "one leader, one term"
    # The public path agrees: `meshq status --json --node ID` (that node's own view, through a client).
    for node in nodes:
        result = run_cli("status", "--json", "--node", node_id(node), "--cluster", mesh.cluster,
                         "--seed", node.seed, "--no-mdns", timeout_s=60)
        assert result.returncode == 0, result.stderr.decode()
        public = json.loads(result.stdout)
        assert public["node_id"] == node_id(node)
        assert sorted(public["metadata"]["voters"]) == sorted(ids)
        assert {m["node_id"] for m in public["members"] if m["role"] == "storage" and m["state"] == "alive"} == ids


@pytest.mark.timeout(90)
def test_one_seed_is_enough_gossip_introduces_the_rest(mesh, timings):
    first = mesh.start(1)[0]  # --no-mdns everywhere
    started = time.monotonic()
    others = mesh.start(3, seeds=[first])  # each told only about the first node
    nodes = [first, *others]
    views = wait_agreement(nodes, timeout_s=30)
    timings("seed + gossip -> 4 nodes agree on membership", time.monotonic() - started)
    ids = {node_id(n) for n in nodes}
    for node in others:
        states = member_states(views[node_id(node)])
        never_told = ids - {node_id(node), node_id(first)}
        assert all(states[other] == "alive" for other in never_told), (
            f"{node_id(node)} should know the peers it was never told about: {states}")
        assert sorted(views[node_id(node)]["metadata"]["voters"]) == sorted(ids)


@pytest.mark.timeout(90)
def test_kill_9_is_seen_by_every_survivor_within_the_failure_timeout(mesh, timings):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    views = wait_agreement(nodes, timeout_s=30)
    leader = next(iter(views.values()))["metadata"]["leader"]
    victim = next(n for n in nodes if node_id(n) == leader)  # the metadata leader: the harder case
    survivors = [n for n in nodes if n is not victim]
    victim_id = node_id(victim)

    killed_at = time.monotonic()
    os.kill(victim.process.pid, signal.SIGKILL)
    seen_dead: dict[str, float] = {}
    deadline = killed_at + DETECTION_BOUND_S + 3.0  # keep measuring a little past the bound to report it
    while len(seen_dead) < len(survivors) and time.monotonic() < deadline:
        for node in survivors:
            if node_id(node) in seen_dead:
                continue
            status = view(node, timeout_s=0.5)
            if status is not None and member_states(status).get(victim_id) == "dead":
                seen_dead[node_id(node)] = time.monotonic() - killed_at
        time.sleep(0.05)
    victim.kill()  # reap
    for survivor, seconds in sorted(seen_dead.items()):
        timings(f"kill -9 -> {survivor} sees the node dead", seconds)
    assert len(seen_dead) == len(survivors), f"not every survivor saw {victim_id} dead: {seen_dead}\n" + describe(
        survivors)
    assert max(seen_dead.values()) <= DETECTION_BOUND_S, (
        f"detection took {seen_dead} s; failure_timeout is {FAILURE_TIMEOUT_S} s, bound {DETECTION_BOUND_S} s")
    assert min(seen_dead.values()) >= FAILURE_TIMEOUT_S * 0.5, "declared dead before half the failure timeout"

    # The two survivors are a majority of the 3 voters: they elect a new metadata leader among themselves.
    def new_leader():
        leaders = set()
        for node in survivors:
            status = view(node, timeout_s=0.5)
            if status is None:
                return None
            leaders.add(status["metadata"]["leader"])
        return leaders if len(leaders) == 1 and None not in leaders and victim_id not in leaders else None

    wait_until(new_leader, 15, "a new metadata leader among the survivors")
    timings("kill -9 of the metadata leader -> survivors agree on a new one (upper bound)",
            time.monotonic() - killed_at)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("which", [
    "seeded",
    "seedless",
])
def test_a_killed_node_restarted_on_its_data_dir_is_alive_again_everywhere(mesh, timings, which):
    first = mesh.start(1)[0]  # knows no one: the others are told about it (--seed)
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=30)
    victim = first if which == "seedless" else nodes[1]
    victim_id = node_id(victim)
    victim.kill()
    wait_until(lambda: all(member_states(view(n) or {"members": []}).get(victim_id) == "dead"
                           for n in nodes if n is not victim), 10, "the survivors to see the node dead")
    restarted_at = time.monotonic()
    victim.start()  # same data directory, same port: same node id, newer incarnation
    assert node_id(victim) == victim_id
    wait_agreement(nodes, timeout_s=15)
    timings(f"restart of a killed {which} node -> alive and agreed again", time.monotonic() - restarted_at)


@pytest.mark.timeout(90)
def test_nodes_of_another_cluster_on_the_same_host_are_ignored(mesh):
    ours = mesh.start(3, mdns=True)
    theirs_cluster = f"{mesh.cluster}-other"
    theirs = mesh.start(1, mdns=True, cluster=theirs_cluster)
    # Even a node of the other cluster pointed straight at one of ours (a seed) must be refused.
    theirs += mesh.start(1, mdns=True, cluster=theirs_cluster, seeds=[ours[0]])
    our_ids = {node_id(n) for n in ours}
    their_ids = {node_id(n) for n in theirs}
    wait_agreement(ours, timeout_s=30)
    wait_agreement(theirs, timeout_s=30)
    # Keep watching for a while: mDNS announcements repeat, and heartbeats and gossip run every 0.5 s.
    watch_until = time.monotonic() + 4.0
    while True:
        for group, foreign in ((ours, their_ids), (theirs, our_ids)):
            for node in group:
                status = view(node)
                assert status is not None, f"{node.seed} stopped answering"
                seen = set(member_states(status)) | set(status["metadata"]["voters"]) | set(
                    status["ring"]["members"])
                assert not seen & foreign, f"{status['node_id']} ({status['cluster']}) knows foreign nodes {seen & foreign}"
        if time.monotonic() >= watch_until:
            break
        time.sleep(0.5)
    assert sorted(view(theirs[0])["metadata"]["voters"]) == sorted(their_ids)
    assert sorted(view(ours[0])["metadata"]["voters"]) == sorted(our_ids)


@pytest.mark.timeout(120)
def test_each_node_reports_round_trips_to_the_peers_it_replicates_with(mesh):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=30)
    produced = run_cli("produce", "rtt", "--acks", "quorum", "--cluster", mesh.cluster, "--seed", nodes[0].seed,
                       "--no-mdns", input_bytes=b"".join(b"%d\n" % i for i in range(20)), timeout_s=60)
    assert produced.returncode == 0, produced.stderr.decode()
    ids = {node_id(n) for n in nodes}

    def measured() -> bool:
        for node in nodes:
            status = view(node, timeout_s=2.0)
            rtts = (status or {}).get("peer_rtt", {})
            if set(rtts) != ids - {node_id(node)}:
                return False
        return True

    wait_until(measured, timeout_s=30, what="every node measuring both of its peers (status peer_rtt)")
    for node in nodes:
        for peer, entry in view(node, timeout_s=2.0)["peer_rtt"].items():
            # (loopback: a few ms at most, unless the machine starves a node; "slow" is the rule's verdict)
            assert 0 <= entry["rtt_ms"] < 5000 and isinstance(entry["slow"], bool), (node_id(node), peer, entry)
