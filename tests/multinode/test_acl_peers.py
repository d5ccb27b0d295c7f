"""Pub/sub and request/reply between two client nodes of a keyed cluster, and the grants that rule them
(issue #17 item 3, SPEC §3.6; docs/protocol.md "Identity and permissions").

A cluster from `meshq keygen`, two client nodes with their own client keys (alice, bob; neither is the
admin): bob subscribes and alice publishes, alice serves and bob requests, through the mesh, once the
admin granted what each needs. Then the refusals: a client node ignores the offer of a key that may not
``serve`` the service, a serving client node refuses (``AuthorizationError``) a caller whose key may not
``request`` it; a grant takes effect, and a revoke stops it, without restarting anything. Pub/sub grants:
tests/multinode/test_acl_pubsub.py.
"""

from __future__ import annotations

import os

import pytest

import meshq
from tests.multinode.helpers import keyed_client, keyed_mesh, wait_until
from tests.procs import run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def keyed(mesh):
    """(mesh, key set dir, the 3 keyed storage nodes); clients alice and bob added while the nodes run."""
    return keyed_mesh(mesh, "alice", "bob")


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
    admin = keyed_client(mesh, nodes, os.path.join(keys, "clients", "admin"))
    alice = keyed_client(mesh, nodes, os.path.join(keys, "clients", "alice"))
    bob = keyed_client(mesh, nodes, os.path.join(keys, "clients", "bob"))
    try:
        for name, permission, pattern in (("bob", "request", "svc.>"), ("alice", "serve", "svc.echo"),
                                          ("alice", "publish", "events.>"), ("bob", "subscribe", "events.>")):
            assert admin.acl_grant(name, permission, pattern) is True
        service = wait_until(lambda: _serve(alice, "svc.echo"), 30, "alice's node to learn she may serve")
        reply = wait_until(lambda: isinstance(r := _request(bob, "svc.echo"), bytes) and r, 60,
                           "bob's request to reach alice's service")
        assert reply == b"alice:ping"
        subscription = wait_until(lambda: _subscribe(bob, "events.>"), 30, "bob's node to learn he may subscribe")
        wait_until(lambda: _delivered(alice, subscription, "events.one", b"hello"), 60,
                   "a message alice publishes to reach bob's subscription")
        subscription.close()
        service.close()
    finally:
        bob.stop()
        alice.stop()
        admin.stop()


def test_serve_and_request_between_client_nodes_are_refused_until_granted_and_again_after_revoke(keyed):
    mesh, keys, nodes = keyed
    admin_dir = os.path.join(keys, "clients", "admin")
    admin = keyed_client(mesh, nodes, admin_dir)
    alice = keyed_client(mesh, nodes, os.path.join(keys, "clients", "alice"))
    bob = keyed_client(mesh, nodes, os.path.join(keys, "clients", "bob"))
    try:
        # alice may not serve svc.echo: her node says so once it learnt the grants (before, it cannot know)
        refused = wait_until(lambda: _serve_refused(alice, "svc.echo"), 30, "alice's node to refuse to serve")
        assert "client 'alice' may not serve service 'svc.echo': no grant of serve matches it" in str(refused)
        done = run_cli("acl", "grant", "alice", "serve", "svc.>", "--cluster", mesh.cluster, "--seed",
                       nodes[0].seed, "--no-mdns", "--keys", admin_dir, timeout_s=90)
        assert done.returncode == 0 and b"granted serve svc.> to alice" in done.stdout, done.stderr.decode()
        service = wait_until(lambda: _serve(alice, "svc.echo"), 30, "alice's node to learn she may serve")
        # bob may not request it: alice's node refuses him, before the handler runs
        refused = wait_until(lambda: isinstance(r := _request(bob, "svc.echo"), meshq.AuthorizationError) and r, 30,
                             "bob's request to be refused by alice's node")
        assert "client 'bob' may not request service 'svc.echo'" in str(refused)
        assert "meshq acl grant bob request PATTERN" in str(refused)
        admin.acl_grant("bob", "request", "svc.*")
        reply = wait_until(lambda: isinstance(r := _request(bob, "svc.echo"), bytes) and r, 30,
                           "bob's request to be served once granted")
        assert reply == b"alice:ping"
        # revoked: bob's node ignores alice's offer (she still makes it)
        admin.acl_revoke("alice", "serve", "svc.>")
        ignored = wait_until(lambda: isinstance(r := _request(bob, "svc.echo"), meshq.NoRespondersError) and r, 30,
                             "bob's node to ignore alice's offer once revoked")
        assert "ignored: held by alice, with no grant to serve it" in str(ignored)
        admin.acl_grant("alice", "serve", "svc.echo")
        wait_until(lambda: _request(bob, "svc.echo") == b"alice:ping", 30, "alice's offer to be heeded again")
        service.close()
    finally:
        bob.stop()
        alice.stop()
        admin.stop()


def _subscribe(client: meshq.Node, pattern: str):
    try:
        return client.subscribe(pattern)
    except meshq.AuthorizationError:
        return None


def _serve(client: meshq.Node, service: str):
    try:
        return client.serve(service, lambda payload: b"alice:" + payload)
    except meshq.AuthorizationError:
        return None


def _serve_refused(client: meshq.Node, service: str) -> BaseException | None:
    try:
        client.serve(service, lambda payload: payload).close()  # (its node has not learnt the grants yet)
    except meshq.AuthorizationError as exc:
        return exc
    return None
