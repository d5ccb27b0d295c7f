"""A connection across a network cut carries messages again soon after the heal (issue #19 item 10).

Two hosts: a ROUTER echoing every message in one, a DEALER sending one every 50 ms in the other, both made by
``meshq.io.runtime.new_socket`` as every meshq socket is. The cut drops their packets in the network (tc in
the bridge, on each host's port), so each sender's TCP sees no error and backs its retransmissions off
exponentially, as after a real cut; without heartbeats and bounded connect attempts the first echo after a
7 s cut waits for the retransmission due about 12.6 s after the cut began (5-6 s after the heal).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from meshq.io.sockets import CONNECT_TIMEOUT_MS, HEARTBEAT_TIMEOUT_MS
from tests.netns.lab import REPO, child_env, drop_in_bridge, heal_in_bridge

pytestmark = pytest.mark.timeout(120)

CUT_S = 7.0
# The bound: a dead connection is dropped HEARTBEAT_TIMEOUT_MS into the cut, then each connect attempt lasts
# CONNECT_TIMEOUT_MS plus the 100 ms reconnect interval; the rest is slack for a loaded machine.
FIRST_ECHO_WITHIN_S = CONNECT_TIMEOUT_MS / 1000 + 0.1 + 1.4

ECHO = """
import sys, zmq
from meshq.io.sockets import new_socket
sock = new_socket(zmq.Context(), zmq.ROUTER, 1 << 20)
sock.bind(sys.argv[1])
while True:
    sock.send_multipart(sock.recv_multipart())
"""

SEND = """
import sys, time, zmq
from meshq.io.sockets import new_socket
sock = new_socket(zmq.Context(), zmq.DEALER, 1 << 20, None, sys.argv[1])
sock.connect(sys.argv[1])
while True:
    sock.send(b"ping", zmq.NOBLOCK)
    if sock.poll(50):
        while sock.poll(0):
            sock.recv()
            print(time.monotonic(), flush=True)
"""


@pytest.mark.parametrize("lab", [{"hosts": 2}], indirect=True)
def test_first_echo_soon_after_a_cut_heals(lab):
    assert HEARTBEAT_TIMEOUT_MS < CUT_S * 1000  # the cut outlasts the heartbeat timeout: connections are dropped
    one, two = lab.hosts
    endpoint = f"tcp://{two.address}:7300"
    procs = []
    echoes: list[float] = []
    try:
        for host, code in ((two, ECHO), (one, SEND)):
            procs.append(subprocess.Popen(["ip", "netns", "exec", host.netns, sys.executable, "-c", code, endpoint],
                                          stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env()))
        reader = threading.Thread(target=lambda: echoes.extend(float(line) for line in procs[1].stdout),
                                  daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while len(echoes) < 10:
            assert time.monotonic() < deadline, "no echo before the cut"
            time.sleep(0.05)
        for host, peer in ((one, two), (two, one)):  # packets towards host from peer die in the bridge
            drop_in_bridge(lab.bridge_netns, f"p{host.index}", "match", "ip", "src", f"{peer.address}/32")
        cut = time.monotonic()
        time.sleep(CUT_S)
        for host in (one, two):
            heal_in_bridge(lab.bridge_netns, f"p{host.index}")
        healed = time.monotonic()
        deadline = healed + 15
        while not any(t >= healed for t in echoes) and time.monotonic() < deadline:
            time.sleep(0.02)
        during = [t for t in echoes if cut + 0.5 < t < healed]
        after = [t for t in echoes if t >= healed]
        assert not during, f"echoes during the cut: the cut did not cut ({len(during)})"
        assert after, "no echo within 15 s after the heal"
        assert after[0] - healed <= FIRST_ECHO_WITHIN_S, (
            f"first echo {after[0] - healed:.2f} s after the heal (bound {FIRST_ECHO_WITHIN_S:.1f} s)")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
