"""``meshq keygen`` and key loading (meshq.keys): layout, permissions, and the errors of a wrong ``--keys``."""

from __future__ import annotations

import os
import stat

import pytest
import zmq.auth

from meshq.errors import ConfigError
from meshq.keys import add_client, fingerprint, keygen, load

pytestmark = pytest.mark.timeout(60)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keygen_layout_and_modes(tmp_path):
    root = keygen(tmp_path / "keys")
    cluster, admin = root / "cluster", root / "clients" / "admin"
    assert sorted(p.name for p in cluster.iterdir()) == ["cluster.key", "cluster.key_secret", "trusted"]
    assert sorted(p.name for p in admin.iterdir()) == ["client.key", "client.key_secret", "cluster.key"]
    for secret in (cluster / "cluster.key_secret", admin / "client.key_secret"):
        assert _mode(secret) == 0o600
    cluster_public, cluster_secret = zmq.auth.load_certificate(str(cluster / "cluster.key_secret"))
    assert cluster_secret and zmq.auth.load_certificate(str(admin / "cluster.key"))[0] == cluster_public
    admin_public = zmq.auth.load_certificate(str(admin / "client.key"))[0]
    assert zmq.auth.load_certificate(str(cluster / "trusted" / "admin.key"))[0] == admin_public

    node_keys = load(cluster, "cluster")
    client_keys = load(admin, "client")
    assert node_keys.public == cluster_public and node_keys.secret == cluster_secret
    assert client_keys.public == admin_public and client_keys.cluster_public == cluster_public
    assert client_keys.name == "admin"
    assert node_keys.fingerprint == client_keys.fingerprint == fingerprint(cluster_public)
    assert len(node_keys.fingerprint) == 16 and cluster_secret.hex()[:16] not in node_keys.fingerprint
    assert node_keys.trusted_keys() == {cluster_public, admin_public}


def test_client_added_later_is_trusted_from_then_on(tmp_path):
    root = keygen(tmp_path / "keys")
    node_keys = load(root / "cluster", "cluster")
    before = node_keys.trusted_keys()
    bob = add_client(root, "bob")
    assert _mode(bob / "client.key_secret") == 0o600
    bob_public = load(bob, "client").public
    assert bob_public not in before and bob_public in node_keys.trusted_keys()
    with pytest.raises(ConfigError, match="already exists"):
        add_client(root, "bob")
    with pytest.raises(ConfigError, match="client name"):
        add_client(root, "../x")


def test_keygen_refuses_an_existing_key_set(tmp_path):
    root = keygen(tmp_path / "keys")
    before = (root / "cluster" / "cluster.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a key set"):
        keygen(root)
    assert (root / "cluster" / "cluster.key").read_bytes() == before
    with pytest.raises(ConfigError, match="holds no key set"):
        add_client(tmp_path / "empty", "bob")


def test_load_says_what_is_wrong(tmp_path):
    root = keygen(tmp_path / "keys")
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope", "cluster")
    with pytest.raises(ConfigError, match="client's key directory; a storage node needs the cluster's"):
        load(root / "clients" / "admin", "cluster")
    with pytest.raises(ConfigError, match="cluster's key directory; a client needs its own"):
        load(root / "cluster", "client")
    os.chmod(root / "cluster" / "cluster.key_secret", 0o644)
    with pytest.raises(ConfigError, match="can be read by others .*chmod 600"):
        load(root / "cluster", "cluster")
    os.remove(root / "clients" / "admin" / "client.key_secret")
    with pytest.raises(ConfigError, match="secret key file .* is missing"):
        load(root / "clients" / "admin", "client")


def test_node_refuses_a_client_key_dir(tmp_path):
    import meshq

    root = keygen(tmp_path / "keys")
    node = meshq.Node(cluster="k", data_dir=tmp_path / "data", mdns=False, keys=root / "clients" / "admin")
    with pytest.raises(ConfigError, match="a storage node needs the cluster's"):
        node.start()
    # nothing held: the data directory can be used again at once
    node = meshq.Node(cluster="k", data_dir=tmp_path / "data", mdns=False, keys=root / "cluster",
                      replication_factor=1).start()
    try:
        assert node.runtime.curve is not None
    finally:
        node.stop()


def test_mdns_records_of_another_cluster_key_are_ignored():
    from meshq.io.discovery import PROTOCOL_VERSION, parse_service

    def record(**extra: str) -> dict:
        base = {"cluster": "shop", "node_id": "n1", "proto": str(PROTOCOL_VERSION), "role": "storage",
                "port": "7450", "pub_port": "7451", "incarnation": "1", **extra}
        return {k.encode(): v.encode() for k, v in base.items()}

    ours = "0123456789abcdef"
    assert parse_service(record(key=ours), ["127.0.0.1"], "shop", ours)["node_id"] == "n1"
    assert parse_service(record(key="fedcba9876543210"), ["127.0.0.1"], "shop", ours) is None  # another key
    assert parse_service(record(), ["127.0.0.1"], "shop", ours) is None  # a node without keys
    assert parse_service(record(key=ours), ["127.0.0.1"], "shop") is None  # we have no keys, it has
    assert parse_service(record(), ["127.0.0.1"], "shop")["node_id"] == "n1"
    assert parse_service(record(key=ours), ["127.0.0.1"], "mall", ours) is None  # another cluster
