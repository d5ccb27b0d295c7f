"""Pub/sub and request/reply between two client nodes of a keyed cluster, and the grants that rule them
(issue #17 item 3, SPEC §3.6; docs/protocol.md "Identity and permissions").

A cluster from `meshq keygen`, two client nodes with their own client keys (alice, bob; neither is the
admin): bob subscribes and alice publishes, alice serves and bob requests, through the mesh, once the
admin granted what each needs.
"""

from __future__ import annotations

import os

import pytest

import meshq
from tests.multinode.helpers import wait_until
from tests.procs import run_cli

pytestmark = pytest.mark.timeout(300)


def _keygen(*args: str) -> None:
    done = run_cli("keygen", *args, timeout_s=60)
    assert done.returncode == 0, done.stderr.decode()


@pytest.fixture
def keyed(mesh):
    """(mesh, key set dir, the 3 keyed storage nodes); clients alice and bob added while the nodes run."""
    keys = os.path.join(mesh.root, "keys")
    _keygen(keys)
    extra = ["--keys", os.path.join(keys, "cluster"), "--replication-factor", "3", "--partitions", "2"]
    first = mesh.start(1, extra=extra)
    nodes = first + mesh.start(2, seeds=first, extra=extra)
    _keygen(keys, "--client", "alice")
    _keygen(keys, "--client", "bob")
    return mesh, keys, nodes


def _client(mesh, nodes, keys_dir: str) -> meshq.Node:
    node = meshq.Node(cluster=mesh.cluster, role="client", mdns=False, seeds=[n.seed for n in nodes], keys=keys_dir)
    node.start()
    try:
        node.wait_ready(timeout=30)
    except BaseException:
        node.stop()
        raise
    return node


def _request(client: meshq.Node, service: str, payload: bytes = b"ping") -> bytes | BaseException:
    try:
        return client.request(service, payload, timeout=2)
    except meshq.MeshqError as exc:
        return exc


def _delivered(publisher: meshq.Node, subscription, subject: str, data: bytes) -> bool:
    publisher.publish(subject, data)
    try:
        while True:
            message = subscription.recv(timeout=0.3)
            if message.data == data:
                return True
    except meshq.MeshqError:
        return False


def test_two_keyed_client_nodes_publish_subscribe_request_and_serve_through_the_mesh(keyed):
    mesh, keys, nodes = keyed
    admin = _client(mesh, nodes, os.path.join(keys, "clients", "admin"))
    alice = _client(mesh, nodes, os.path.join(keys, "clients", "alice"))
    bob = _client(mesh, nodes, os.path.join(keys, "clients", "bob"))
    try:
        for name, permission, pattern in (("bob", "request", "svc.>"),):
            assert admin.acl_grant(name, permission, pattern) is True
        service = alice.serve("svc.echo", lambda payload: b"alice:" + payload)
        reply = wait_until(lambda: isinstance(r := _request(bob, "svc.echo"), bytes) and r, 60,
                           "bob's request to reach alice's service")
        assert reply == b"alice:ping"
        subscription = bob.subscribe("events.>")
        wait_until(lambda: _delivered(alice, subscription, "events.one", b"hello"), 60,
                   "a message alice publishes to reach bob's subscription")
        subscription.close()
        service.close()
    finally:
        bob.stop()
        alice.stop()
        admin.stop()
