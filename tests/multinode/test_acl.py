"""Permissions per client key on a keyed 3-node cluster (issue #17 item 3, SPEC §3.6).

A client key added while the nodes run (`keygen --client alice`) is trusted but holds no permission:
its produce is refused with ``AuthorizationError`` and nothing is stored; once the admin grants
``produce orders.>`` (`meshq acl grant`), it produces, without restarting any node; a revoke refuses it
again; `meshq acl list` shows the grants, and they survive a restart of every node.
"""

from __future__ import annotations

import json
import os

import pytest

import meshq
from tests.multinode.helpers import keyed_client, start_all, wait_until
from tests.procs import run_cli

pytestmark = pytest.mark.timeout(300)
TOPIC = "orders.eu"


def _cli(mesh, nodes, *args: str, keys_dir: str, input_bytes: bytes | None = None):
    return run_cli(*args, "--cluster", mesh.cluster, "--seed", nodes[0].seed, "--no-mdns", "--keys", keys_dir,
                   input_bytes=input_bytes, timeout_s=90)


def _produce(client: meshq.Node, value: bytes) -> BaseException | None:
    try:
        client.produce(TOPIC, value, timeout=5)
    except meshq.MeshqError as exc:
        return exc
    return None


def _stored(admin: meshq.Node) -> list[bytes]:
    """Every value in the topic, read with the admin key (which holds every permission)."""
    values = []
    consumer = admin.consumer(TOPIC, start="earliest")
    try:
        for _ in range(20):
            batch = consumer.poll(timeout=0.3, max_records=1000)
            values.extend(r.value for r in batch)
    finally:
        consumer.close()
    return sorted(values)


def test_a_client_key_is_refused_until_granted_revoked_again_and_grants_survive_restarts(mesh):
    keys = os.path.join(mesh.root, "keys")
    assert run_cli("keygen", keys, timeout_s=60).returncode == 0
    extra = ["--keys", os.path.join(keys, "cluster"), "--replication-factor", "3", "--partitions", "2"]
    first = mesh.start(1, extra=extra)
    nodes = first + mesh.start(2, seeds=first, extra=extra)
    admin_dir = os.path.join(keys, "clients", "admin")
    done = run_cli("keygen", keys, "--client", "alice", timeout_s=60)  # after the nodes started
    assert done.returncode == 0 and b"holds no permission until granted" in done.stdout, done.stderr.decode()
    alice_dir = os.path.join(keys, "clients", "alice")

    admin = keyed_client(mesh, nodes, admin_dir)
    alice = keyed_client(mesh, nodes, alice_dir)
    try:
        admin.create_topic(TOPIC, partitions=2, replication_factor=3)
        admin.produce(TOPIC, b"by-admin", timeout=10)
        refused = _produce(alice, b"refused")
        assert isinstance(refused, meshq.AuthorizationError), repr(refused)
        assert "client 'alice' may not produce topic 'orders.eu'" in str(refused)
        # alice may not grant herself anything either
        with pytest.raises(meshq.AuthorizationError, match="only the admin key"):
            alice.acl_grant("alice", "produce", ">")
        # the CLI says what was refused and why
        done = _cli(mesh, nodes, "produce", TOPIC, keys_dir=alice_dir, input_bytes=b"refused-cli\n")
        assert done.returncode != 0 and b"may not produce topic 'orders.eu'" in done.stderr, done.stderr.decode()

        done = _cli(mesh, nodes, "acl", "grant", "alice", "produce", "orders.>", keys_dir=admin_dir)
        assert done.returncode == 0 and b"granted produce orders.> to alice" in done.stdout, done.stderr.decode()
        # every node applies the grant from the metadata log; no node restarted
        wait_until(lambda: _produce(alice, b"granted") is None, 30, "alice's produce to be accepted once granted")
        done = _cli(mesh, nodes, "acl", "list", "--json", keys_dir=admin_dir)
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout) == [{"name": "alice", "permission": "produce", "pattern": "orders.>"}]
        with pytest.raises(meshq.AuthorizationError, match="may not consume topic 'orders.eu'"):
            consumer = alice.consumer(TOPIC, start="earliest")
            try:
                consumer.poll(timeout=5)
            finally:
                consumer.close()
        with pytest.raises(meshq.AuthorizationError, match="may not consume topic 'orders.eu'"):
            consumer = alice.consumer(TOPIC, group="readers")  # the group's join is refused: said, not retried
            try:
                for _ in range(50):
                    consumer.poll(timeout=0.2)
            finally:
                consumer.close()

        done = _cli(mesh, nodes, "acl", "revoke", "alice", "produce", "orders.>", keys_dir=admin_dir)
        assert done.returncode == 0, done.stderr.decode()
        wait_until(lambda: isinstance(_produce(alice, b"after-revoke"), meshq.AuthorizationError), 30,
                   "alice's produce to be refused again after the revoke")
        stored = _stored(admin)
        assert b"refused" not in stored and b"refused-cli" not in stored
        assert stored.count(b"granted") >= 1 and b"by-admin" in stored
        assert admin.acl_grant("alice", "consume", "orders.*") is True
    finally:
        alice.stop()
        admin.stop()

    for node in nodes:  # every node restarts on its data: the grants come back from the metadata log
        assert node.stop().clean, node.log_text()[-2000:]
    start_all(nodes)
    done = _cli(mesh, nodes, "acl", "list", keys_dir=admin_dir)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.split() == [b"alice", b"consume", b"orders.*"]
    alice = keyed_client(mesh, nodes, alice_dir)
    try:
        assert isinstance(_produce(alice, b"after-restart"), meshq.AuthorizationError)
        done = _cli(mesh, nodes, "consume", TOPIC, "--max", "1", "--timeout", "30", keys_dir=alice_dir)
        assert done.returncode == 0, done.stderr.decode()
    finally:
        alice.stop()
