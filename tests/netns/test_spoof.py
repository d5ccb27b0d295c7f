"""Spoofed mDNS records on the LAN (issue #17 item 5): the mesh ignores them and keeps working.

Four "hosts" (network namespaces on one bridge): three run ``meshq node``, with a cluster key set (``meshq keygen``:
CURVE on every socket) and without keys, the fourth is an attacker. The attacker runs ``tests.netns.spoof``: python-zeroconf pinned
to its own address announcing ``_meshq._tcp.local.`` records crafted like a node's (``meshq.io.discovery``), each
announced again every second with a higher incarnation:

1. the right cluster name with a wrong key fingerprint (``key=``; without keys: any fingerprint);
2. the right cluster name and the right fingerprint (it is public) with ports where nothing listens, and with ports
   where a listener answers garbage;
3. a foreign cluster name;
4. the node id of a live member (with a huge incarnation) at the attacker's address (garbage there).

While the records are heard, a writer in another namespace produces into every partition of a topic (RF 3,
acks=quorum). Checked on every node's own view, polled throughout: no spoofed entry is ever an alive or suspect
member or a voter, records 1 and 3 never enter the member table at all, the taken id keeps its own address and each
node counts the refused record (``counters.member_records_refused``); the writer keeps being acknowledged in every
partition; at the end a consumer drains every partition: nothing acknowledged is lost, and the nodes stop cleanly.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest

import meshq
from tests.multinode.helpers import check_writes, partitions_of, wait_until
from tests.netns.lab import REPO, Lab, can_use_netns, child_env
from tests.netns.test_lan import states, wait_agreement
from tests.procs import end_process, read_ready_line

pytestmark = pytest.mark.skipif(not can_use_netns(),
                                reason="network-namespace tests need root and iproute2 (ip netns)")

TOPIC = "ns-spoof"
PARTITIONS = 3
GARBAGE_PORTS = (7200, 7201)
HUGE_INCARNATION = 1 << 60


def replication_state(lab: Lab) -> dict[int, dict] | None:
    views = lab.probe(lab.nodes[0].host, lab.nodes)
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
        if len(mine["replicas"]) != 3 or set(mine["in_sync"]) != set(mine["replicas"]):
            return None
        state[partition] = mine
    return state


def consume_all(lab: Lab) -> list[meshq.Record]:
    host, node = lab.hosts[0], lab.nodes[0]
    result = host.meshq("consume", TOPIC, "--json", "--from", "earliest", "--timeout", "6", "--seed", node.seed,
                        *lab.client_args(), timeout_s=180)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    records = []
    for line in result.stdout.decode().splitlines():
        r = json.loads(line)
        value = r["value"].encode() if "value" in r else base64.b64decode(r["value_b64"])
        records.append(meshq.Record(r["topic"], r["partition"], r["offset"], None, value))
    return records


@pytest.mark.timeout(300)
@pytest.mark.parametrize("lab", [{"hosts": 4, "keys": True}, {"hosts": 4, "keys": False}], indirect=True,
                         ids=["keys", "no-keys"])
def test_spoofed_mdns_records_are_ignored_and_the_mesh_keeps_working(lab):
    from meshq.config import PROTOCOL_VERSION
    from meshq.keys import load

    attacker = lab.hosts[3]
    for host in lab.hosts[:3]:  # no seeds: mDNS introduces them, as on a LAN
        lab.start_node(host)
    wait_agreement(lab, timeout_s=60)
    real_ids = {n.node_id for n in lab.nodes}
    created = lab.hosts[0].meshq("topics", "create", TOPIC, "--partitions", str(PARTITIONS), "--replication-factor",
                                 "3", "--seed", lab.nodes[0].seed, *lab.client_args())
    assert created.returncode == 0, created.stderr.decode()
    wait_until(lambda: replication_state(lab), 60, "every replica of the topic in sync", 0.5)
    writer = lab.start_writer(lab.hosts[1], "w", TOPIC, PARTITIONS)
    writer.wait_ready(45)
    wait_until(lambda: all(writer.log.acks_since(0.0, p) >= 5 for p in range(PARTITIONS)), 45,
               "the writer acknowledged in every partition", 0.2)

    victim = lab.nodes[2]
    fingerprint = load(lab.node_keys, "cluster").fingerprint if lab.node_keys else ""  # public: in every record
    base = {"cluster": lab.cluster, "proto": PROTOCOL_VERSION, "role": "storage", "incarnation": 1,
            "key": fingerprint}
    records = {
        "wrong-key": {**base, "node_id": "spoof-wrong-key", "key": "0123456789abcdef", "port": GARBAGE_PORTS[0],
                      "pub_port": GARBAGE_PORTS[1]},
        "dead-ports": {**base, "node_id": "spoof-dead-ports", "port": 7990, "pub_port": 7991},
        "garbage": {**base, "node_id": "spoof-garbage", "port": GARBAGE_PORTS[0], "pub_port": GARBAGE_PORTS[1]},
        "foreign": {**base, "cluster": f"other-{lab.tag}", "node_id": "spoof-foreign", "port": GARBAGE_PORTS[0],
                    "pub_port": GARBAGE_PORTS[1]},
        "taken-id": {**base, "node_id": victim.node_id, "port": GARBAGE_PORTS[0], "pub_port": GARBAGE_PORTS[1],
                     "incarnation": HUGE_INCARNATION},
    }
    command = ["ip", "netns", "exec", attacker.netns, sys.executable, "-m", "tests.netns.spoof",
               "--interface", attacker.address]
    for name, txt in records.items():
        command += ["--record", json.dumps({"name": f"evil-{name}", **txt})]
    for port in GARBAGE_PORTS:
        command += ["--garbage-port", str(port)]
    log_path = f"{lab.root}/spoof.log"
    with open(log_path, "ab") as log:
        spoofer = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                                   env=child_env())
    try:
        line, problem = read_ready_line(spoofer, 30)
        assert line.startswith(b"{"), f"the spoofer did not start: {problem or line!r}\n{open(log_path).read()}"
        spoofed_s = time.monotonic()
        never_members = {"spoof-wrong-key", "spoof-foreign"}
        never_live = {"spoof-dead-ports", "spoof-garbage"}
        seen_joining: set[str] = set()
        problems: list[str] = []
        refused: dict[str, int] = {}
        while time.monotonic() - spoofed_s < 20:  # 20 announcements of every record
            for status in lab.probe(lab.nodes[0].host, lab.nodes).values():
                if status is None:
                    problems.append("a node did not answer status while the spoofer ran")
                    continue
                me = status["node_id"]
                view = states(status)
                where = {m["node_id"]: m["address"] for m in status["members"]}
                for spoof in never_members & set(view):
                    problems.append(f"{me} lists {spoof} ({view[spoof]}) as a member")
                for spoof in never_live & set(view):
                    seen_joining.add(spoof)
                    if view[spoof] in ("alive", "suspect"):
                        problems.append(f"{me} sees {spoof} {view[spoof]}")
                if me != victim.node_id and where.get(victim.node_id) != f"tcp://{victim.seed}":
                    problems.append(f"{me} has {victim.node_id} at {where.get(victim.node_id)}")
                if set(status["metadata"]["voters"]) != real_ids:
                    problems.append(f"{me} has voters {status['metadata']['voters']}")
                refused[me] = status["counters"].get("member_records_refused", 0)
            time.sleep(0.5)
        problems = sorted(set(problems))
        assert not problems, "\n".join(problems[:30])
        # The records did arrive (else this test proves nothing): the two that pass the cluster and key filters
        # showed up as never-heard members, and every other node refused the taken id.
        assert seen_joining == never_live, f"spoofed records never heard: {never_live - seen_joining}"
        assert all(refused[n] > 0 for n in real_ids - {victim.node_id}), f"refused counts: {refused}"
        assert all(writer.log.acks_since(spoofed_s, p) >= 5 for p in range(PARTITIONS)), \
            "the writer was not acknowledged in every partition while the spoofer ran"
        print(f"writer acks during 20 s of spoofed records: "
              f"{sum(writer.log.acks_since(spoofed_s, p) for p in range(PARTITIONS))}")
    finally:
        if spoofer.stdin is not None:
            spoofer.stdin.close()
        end_process(spoofer, 10, already_asked=True)
    report = writer.stop()
    attempts = writer.log.snapshot()
    acked_end: dict[int, int] = {}
    for a in attempts:
        if a.ok:
            acked_end[a.partition] = max(acked_end.get(a.partition, 0), a.offset + 1)
    state = wait_until(lambda: (s := replication_state(lab)) and all(
        s[p]["high_watermark"] >= m for p, m in acked_end.items()) and s, 60, "replicas settled", 0.5)
    high_watermarks = {p: d["high_watermark"] for p, d in state.items()}
    records_read = consume_all(lab)
    check = check_writes(attempts, writer.log.produced, records_read, high_watermarks)
    problems = check.problems()
    stopped = {n.node_id: n.stop() for n in lab.nodes}
    problems += [f"node {nid} did not stop cleanly: {result}" for nid, result in stopped.items() if not result.clean]
    print(f"SUMMARY netns spoof: {check.summary()} refused={refused} writer: {report}")
    assert not problems, "\n".join(problems)
