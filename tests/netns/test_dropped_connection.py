"""A produce whose connection dropped is answered soon after the link heals, not at its deadline (issue #19 item
10), on both paths: a calling thread's own DEALER (``meshq.io.direct``: "A dropped connection sends again") and
the node's runtime (``produce_async``: the runtime's drop monitor tells the core ``PeerDisconnected``, which fails
the requests pending on that peer as retriable, and the producer room sends the batch again).

Two hosts: a one-node cluster in one, a client producing synchronously (``Node.produce``, acks=quorum, 5 s
timeout, one call after another) in the other. The cut drops, in the bridge, only the packets to and from the
node's request port (its ROUTER, ``NODE_PORT``): the client's connections carrying produce requests are dropped
by libzmq's heartbeat timeout, while the node's heartbeats (its PUB, another port) still arrive, so the client
keeps seeing the node alive — as on a lossy link, where enough gets through for the failure detector but a
request connection stalls past the heartbeat timeout. The call in flight at the cut lost its request with the
connection. Before the fix it waited for its deadline (about 5 s after the cut: 2 s after a 3 s cut healed);
now it sends again as soon as it sees the drop, and the copy waiting in the socket goes out on the first
connection after the heal.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from meshq.io.sockets import CONNECT_TIMEOUT_MS, HEARTBEAT_TIMEOUT_MS
from tests.netns.lab import NODE_PORT, REPO, child_env, drop_in_bridge, heal_in_bridge

pytestmark = pytest.mark.timeout(180)

CUT_S = 3.0
CALL_TIMEOUT_S = 5.0
# After the heal: one connect attempt (CONNECT_TIMEOUT_MS) plus the 100 ms reconnect interval, then the answer;
# the rest is slack for a loaded machine. Waiting for the deadline takes CALL_TIMEOUT_S - CUT_S = 2 s at least.
FIRST_ACK_WITHIN_S = CONNECT_TIMEOUT_MS / 1000 + 0.1 + 0.9

CLIENT = """
import sys, time
import meshq
client = meshq.Node(cluster=sys.argv[1], role="client", seeds=[sys.argv[2]], mdns=False, host=sys.argv[3]).start()
client.wait_ready(timeout=60)
until = time.monotonic() + 60
while True:
    try:
        client.create_topic("t", partitions=1, replication_factor=1)
        break
    except meshq.MeshqError:  # the one-node cluster is still forming ("no leader yet; retry")
        if time.monotonic() > until:
            raise
        time.sleep(0.2)
while True:
    started = time.monotonic()
    try:
        if sys.argv[5] == "direct":  # the calling thread's own DEALER (meshq.io.direct)
            client.produce("t", b"x", partition=0, acks="quorum", timeout=float(sys.argv[4]))
        else:  # through the node's runtime (its producer room and DEALER)
            client.produce_async("t", b"x", partition=0, acks="quorum", timeout=float(sys.argv[4])).result()
        print("ok", started, time.monotonic(), flush=True)
    except Exception as exc:
        print("error", started, time.monotonic(), type(exc).__name__, flush=True)
        time.sleep(0.05)
    time.sleep(0.02)
"""


@pytest.mark.parametrize("path", ["direct", "runtime"])
@pytest.mark.parametrize("lab", [{"hosts": 2}], indirect=True)
def test_first_ack_soon_after_a_request_connection_drops(lab, path):
    assert HEARTBEAT_TIMEOUT_MS < CUT_S * 1000  # the cut outlasts the heartbeat timeout: connections are dropped
    client_host, node_host = lab.hosts
    node = lab.start_node(node_host)
    lines: list[list[str]] = []
    log_path = f"{lab.root}/client.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(["ip", "netns", "exec", client_host.netns, sys.executable, "-c", CLIENT, lab.cluster,
                             node.seed, client_host.address, str(CALL_TIMEOUT_S), path],
                            stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                            env=child_env())
    try:
        reader = threading.Thread(target=lambda: lines.extend(line.split() for line in proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while sum(1 for line in lines if line[0] == "ok") < 20:
            assert time.monotonic() < deadline and proc.poll() is None, (
                f"no acks before the cut: {lines[-5:]}; the client's log ends:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.05)
        # Packets to the node's request port die in the bridge on their way to the node, and its answers on
        # their way back; nothing else is touched.
        for port, match in ((f"p{node_host.index}", "dport"), (f"p{client_host.index}", "sport")):
            drop_in_bridge(lab.bridge_netns, port, "match", "ip", "protocol", "6", "0xff", "match", "ip", match,
                           str(NODE_PORT), "0xffff")
        cut = time.monotonic()
        time.sleep(CUT_S)
        for port in (f"p{node_host.index}", f"p{client_host.index}"):
            heal_in_bridge(lab.bridge_netns, port)
        healed = time.monotonic()
        deadline = healed + CALL_TIMEOUT_S + 10
        while not any(line[0] == "ok" and float(line[2]) >= healed for line in lines):
            assert time.monotonic() < deadline, f"no ack within {deadline - healed:.0f} s of the heal: {lines[-5:]}"
            time.sleep(0.02)
        acks = [float(line[2]) for line in lines if line[0] == "ok"]
        errors = [line for line in lines if line[0] == "error" and float(line[2]) >= cut]
        during = [t for t in acks if cut + 0.5 < t < healed]
        first = min(t for t in acks if t >= healed)
        assert not during, f"acks during the cut: the cut did not cut ({len(during)})"
        print(f"heal -> first ack {first - healed:.2f} s; calls failed across the cut: {len(errors)}")
        assert first - healed <= FIRST_ACK_WITHIN_S, (
            f"first ack {first - healed:.2f} s after the heal (bound {FIRST_ACK_WITHIN_S:.1f} s; a call waiting for "
            f"its deadline answers {cut + CALL_TIMEOUT_S - healed:.1f} s after it); failed calls: {errors}")
        assert not errors, f"calls failed across the cut (each should have been answered after the heal): {errors}"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
