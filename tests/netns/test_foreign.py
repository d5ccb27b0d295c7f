"""Two meshes of the same cluster name that meet stay apart (issue #19 item 7; docs/operations.md, "Two clusters
of the same name").

Four "hosts" (network namespaces) on two separate LANs (bridges): hosts 1-2 on one, hosts 3-4 on the other. Each
pair forms a 2-node mesh of the same cluster name by mDNS alone, creates topic ``ns-foreign`` (2 partitions, RF 2)
and a writer on each side produces with acks=quorum. Then a cable joins the two LANs: every node now hears the
other mesh's mDNS records (every host browses once after the join: see ``BROWSE``) and its heartbeats. Checked on
every node's own view, polled for 30 s after the join: its
metadata voters and alive members are its own side only, every partition's replicas are of its own side, and it
counted the other side's nodes as refused (``counters.foreign_refused``: they did meet); both writers keep being
acknowledged in every partition. At the end a consumer on each side drains its side's topic: every acknowledged
record of that side's writer is there, and no record of the other side (``unexpected = 0``): the two logs of each
partition never mixed. The nodes stop cleanly.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

import meshq
from tests.multinode.helpers import check_writes, partitions_of, wait_until
from tests.netns.lab import Lab, NsNode, can_use_netns
from tests.netns.test_lan import states

pytestmark = pytest.mark.skipif(not can_use_netns(),
                                reason="network-namespace tests need root and iproute2 (ip netns)")

TOPIC = "ns-foreign"
PARTITIONS = 2

# A host browsing _meshq._tcp.local. for a few seconds, mDNS pinned to its own address (argv[1]). Its browser's
# queries after the first are multicast (QM): every responder answers by multicast, so every node on the LAN
# caches those answers and its own browser reports services it had not seen. That is how nodes that have run for
# a while meet after two LANs are joined: a python-zeroconf browser queries only at its start (4 queries within
# ~14 s) and later only to refresh records near expiry.
BROWSE = """
import sys, time
from zeroconf import IPVersion, ServiceBrowser, Zeroconf
from meshq.io.discovery import SERVICE_TYPE
zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[lambda **kwargs: None])
time.sleep(float(sys.argv[2]))
browser.cancel()
zc.close()
"""


def browse(lab: Lab, seconds: float = 6.0) -> None:
    """Every host browses mDNS once (see ``BROWSE``), all at the same time."""
    import subprocess
    import sys

    from tests.netns.lab import REPO, child_env

    processes = [subprocess.Popen(["ip", "netns", "exec", h.netns, sys.executable, "-c", BROWSE, h.address,
                                   str(seconds)], cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for h in lab.hosts]
    for process in processes:
        _out, err = process.communicate(timeout=seconds + 30)
        assert process.returncode == 0, err.decode()[-2000:]


def side_state(lab: Lab, side: list[NsNode]) -> dict[int, dict] | None:
    """Each partition as its leader reports it, once both nodes of ``side`` agree on it and it has both in sync."""
    views = lab.probe(side[0].host, side)
    if any(v is None for v in views.values()):
        return None
    parts = {v["node_id"]: partitions_of(v, TOPIC) for v in views.values()}
    if any(len(p) != PARTITIONS for p in parts.values()):
        return None
    state = {}
    for partition in range(PARTITIONS):
        leaders = {p[partition]["leader"] for p in parts.values()}
        if len(leaders) != 1 or None in leaders or next(iter(leaders)) not in parts:
            return None
        mine = parts[next(iter(leaders))][partition]
        if len(mine["replicas"]) != 2 or set(mine["in_sync"]) != set(mine["replicas"]):
            return None
        state[partition] = mine
    return state


def side_formed(lab: Lab, side: list[NsNode]) -> bool:
    views = lab.probe(side[0].host, side)
    expected = {n.node_id for n in side}
    if any(v is None for v in views.values()):
        return False
    leaders = {v["metadata"]["leader"] for v in views.values()}
    return (len(leaders) == 1 and None not in leaders
            and all(set(v["metadata"]["voters"]) == expected for v in views.values())
            and all(states(v).get(i) == "alive" for v in views.values() for i in expected))


def consume_all(lab: Lab, node: NsNode) -> list[meshq.Record]:
    result = node.host.meshq("consume", TOPIC, "--json", "--from", "earliest", "--timeout", "6", "--seed", node.seed,
                             *lab.client_args(), timeout_s=180)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    records = []
    for line in result.stdout.decode().splitlines():
        r = json.loads(line)
        value = r["value"].encode() if "value" in r else base64.b64decode(r["value_b64"])
        records.append(meshq.Record(r["topic"], r["partition"], r["offset"], None, value))
    return records


@pytest.mark.timeout(360)
@pytest.mark.parametrize("lab", [{"hosts": 4, "split": 2}], indirect=True)
def test_two_meshes_of_one_name_that_meet_stay_apart_and_keep_serving(lab):
    for host in lab.hosts:  # no seeds: mDNS on each LAN is the only introduction
        lab.start_node(host)
    sides = [lab.nodes[:2], lab.nodes[2:]]
    for side in sides:
        wait_until(lambda side=side: side_formed(lab, side), 60, "each LAN forms its own mesh of 2", 0.3)
        created = side[0].host.meshq("topics", "create", TOPIC, "--partitions", str(PARTITIONS),
                                     "--replication-factor", "2", "--seed", side[0].seed, *lab.client_args())
        assert created.returncode == 0, created.stderr.decode()
    for side in sides:
        wait_until(lambda side=side: side_state(lab, side), 60, "every replica of each side in sync", 0.5)
    writers = [lab.start_writer(side[1].host, f"side{i}", TOPIC, PARTITIONS, seeds=[n.seed for n in side])
               for i, side in enumerate(sides)]
    for writer in writers:
        writer.wait_ready(45)
    wait_until(lambda: all(w.log.acks_since(0.0, p) >= 5 for w in writers for p in range(PARTITIONS)), 45,
               "both writers acknowledged in every partition", 0.2)

    lab.join_bridges()
    joined_s = time.monotonic()
    browse(lab)  # the nodes hear each other's mDNS records (see BROWSE)
    problems: list[str] = []
    refused: dict[str, int] = {}
    while time.monotonic() - joined_s < 30:
        for side in sides:
            own = {n.node_id for n in side}
            for status in lab.probe(side[0].host, side).values():
                if status is None:
                    problems.append("a node did not answer status after the join")
                    continue
                me = status["node_id"]
                if set(status["metadata"]["voters"]) != own:
                    problems.append(f"{me} has voters {status['metadata']['voters']} (its side: {sorted(own)})")
                alive = {i for i, s in states(status).items() if s in ("alive", "suspect")}
                storage = {m["node_id"] for m in status["members"] if m.get("role", "storage") == "storage"}
                if (alive & storage) - own:
                    problems.append(f"{me} sees {(alive & storage) - own} of the other mesh as members")
                for partition, info in partitions_of(status, TOPIC).items():
                    if set(info["replicas"]) - own:
                        problems.append(f"{me}: {TOPIC}/{partition} has replicas {info['replicas']}")
                refused[me] = status["counters"].get("foreign_refused", 0)
        time.sleep(0.5)
    problems = sorted(set(problems))
    assert not problems, "\n".join(problems[:30])
    assert all(refused.get(n.node_id, 0) > 0 for n in lab.nodes), \
        f"the two meshes never met (foreign_refused per node: {refused})"
    assert all(w.log.acks_since(joined_s, p) >= 5 for w in writers for p in range(PARTITIONS)), \
        "a writer was not acknowledged in every partition after the LANs were joined"

    reports = [w.stop() for w in writers]
    all_problems = []
    summaries = []
    for side, writer in zip(sides, writers):
        attempts = writer.log.snapshot()
        acked_end: dict[int, int] = {}
        for a in attempts:
            if a.ok:
                acked_end[a.partition] = max(acked_end.get(a.partition, 0), a.offset + 1)
        state = wait_until(lambda side=side, acked_end=acked_end: (s := side_state(lab, side)) and all(
            s[p]["high_watermark"] >= m for p, m in acked_end.items()) and s, 60, "replicas settled", 0.5)
        high_watermarks = {p: d["high_watermark"] for p, d in state.items()}
        check = check_writes(attempts, writer.log.produced, consume_all(lab, side[0]), high_watermarks)
        all_problems += [f"{writer.name}: {p}" for p in check.problems()]
        summaries.append(f"{writer.name}: {check.summary()}")
    stopped = {n.node_id: n.stop() for n in lab.nodes}
    all_problems += [f"node {nid} did not stop cleanly: {r}" for nid, r in stopped.items() if not r.clean]
    print(f"SUMMARY netns foreign: {summaries} refused={refused} writers: {reports}")
    assert not all_problems, "\n".join(all_problems)
