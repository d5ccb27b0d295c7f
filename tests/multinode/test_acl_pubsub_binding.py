"""A trusted key cannot subscribe to the pub/sub data addressed to another key (issue #17; docs/protocol.md
"Identity and permissions", the keyed PUB).

Three keyed storage nodes and three client nodes: alice may publish ``events.>``, bob may subscribe to it,
mallory holds a trusted key and no grant. Mallory's key, in a raw ZeroMQ SUB socket (modified code), connects
to alice's PUB and subscribes to bob's data prefix, to every data frame (``M``) and to everything (``""``):
alice's XPUB refuses those subscriptions (``subscription_refused``), bob gets alice's messages and the raw
socket gets none. The same run with alice's key check turned off (every subscription taken) shows the raw
socket then does get bob's data: the check is what keeps it out.
"""

from __future__ import annotations

import os
import time

import pytest
import zmq

import meshq
from meshq.core.pubsub import frames
from tests.multinode.helpers import keyed_client, keyed_mesh, received, wait_until

pytestmark = pytest.mark.timeout(300)
QUIET_S = 2.0  # after bob got the last message, how long the raw socket must stay empty


@pytest.fixture
def keyed(mesh):
    return keyed_mesh(mesh, "alice", "bob", "mallory")


def _data_frames(sock: zmq.Socket, wait_s: float) -> list[bytes]:
    """The data frames (first frames starting with ``M``) ``sock`` receives within ``wait_s``."""
    out = []
    deadline = time.monotonic() + wait_s
    while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
        if not sock.poll(left_ms):
            break
        message = sock.recv_multipart()
        if message[0][:1] == frames.DATA_MARK:
            out.append(message[0])
    return out


def _spy_on_bob(keyed, binding: bool) -> tuple[list[bytes], int, bytes]:
    """Run the scenario of the module docstring; ``binding`` False turns alice's key check off. Returns the data
    frames mallory's raw socket received, how many subscriptions alice's PUB refused, and bob's data prefix."""
    mesh, keys, nodes = keyed
    clients = {name: keyed_client(mesh, nodes, os.path.join(keys, "clients", name))
               for name in ("admin", "alice", "bob", "mallory")}
    admin, alice, bob, mallory = (clients[name] for name in ("admin", "alice", "bob", "mallory"))
    context = zmq.Context()
    spy = context.socket(zmq.SUB)
    spy.linger = 0
    try:
        gate = alice.runtime.subscription_gate
        if not binding:
            gate.rule = lambda topic, key: True  # the mutation: every subscription taken, as a plain PUB does
        for name, permission, pattern in (("alice", "publish", "events.>"), ("bob", "subscribe", "events.>")):
            assert admin.acl_grant(name, permission, pattern) is True
        to_bob = wait_until(lambda: _subscribe(bob, "events.>"), 30, "bob's node to learn he may subscribe")
        # (alice's node learns her grant from its own view, which may come after bob's: until then publish raises)
        wait_until(lambda: _published(alice, "events.one", b"first") and received(to_bob, b"first"), 60,
                   "alice's message to reach bob")

        # mallory's trusted key, in a raw SUB socket, at alice's PUB (alice's node knows mallory's key: a member)
        own = mallory.runtime.curve.keys
        spy.curve_publickey, spy.curve_secretkey = own.public, own.secret
        spy.curve_serverkey = alice.runtime.curve.keys.public
        bob_prefix = frames.keyed_data_prefix(bob.node_id, bob.runtime.curve.keys.public)
        for topic in (bob_prefix, frames.DATA_MARK, b""):
            spy.setsockopt(zmq.SUBSCRIBE, topic)
        counters = alice.core.pubsub.counters
        refused_before = counters["subscription_refused"]
        spy.connect(alice.runtime.pub_endpoint)
        if binding:  # the subscriptions reached alice's PUB (and were judged) before anything is published
            wait_until(lambda: counters["subscription_refused"] >= refused_before + 3, 30,
                       "alice's PUB to refuse mallory's three subscriptions")
        else:
            time.sleep(0.5)  # (nothing to wait on: the subscriptions are taken silently)
        seen: list[bytes] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for i in range(20):
                alice.publish("events.one", b"secret-%d" % i)
            assert received(to_bob, b"secret-19", 5.0), "bob did not get alice's messages"
            seen += _data_frames(spy, QUIET_S)
            if binding or seen:
                break
        return seen, counters["subscription_refused"] - refused_before, bob_prefix
    finally:
        spy.close(0)
        context.term()
        for client in clients.values():
            client.stop()


def _published(client: meshq.Node, subject: str, data: bytes) -> bool:
    """True when ``client`` published (its view grants it ``publish`` on ``subject``), False while it may not."""
    try:
        client.publish(subject, data)
    except meshq.AuthorizationError:
        return False
    return True


def _subscribe(client: meshq.Node, pattern: str):
    try:
        return client.subscribe(pattern)
    except meshq.AuthorizationError:
        return None


def test_a_trusted_key_cannot_subscribe_to_another_nodes_data(keyed):
    seen, refused, _ = _spy_on_bob(keyed, binding=True)
    assert seen == []
    assert refused >= 3


def test_without_the_key_check_the_spy_gets_bobs_data(keyed):
    """The mutation: the same run with the check off fails the assertion above (the raw socket gets bob's data)."""
    seen, refused, bob_prefix = _spy_on_bob(keyed, binding=False)
    assert seen, "the raw socket got nothing even with the key check off: the test above proves nothing"
    assert all(frame.startswith(bob_prefix) for frame in seen)  # alice's data for bob
    assert refused == 0
