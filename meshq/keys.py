"""Cluster key sets for CurveZMQ: ``meshq keygen`` writes them, ``--keys`` / ``Node(keys=...)`` loads them.

Theory of operation
-------------------
A key set is a directory ``DIR`` made by ``keygen(DIR)``:

- ``DIR/cluster/`` — what every storage node needs: ``cluster.key`` (public) and
  ``cluster.key_secret`` (the cluster's pair, shared by all storage nodes), and ``trusted/``,
  the public keys the nodes accept as clients (the admin's; ``keygen --client`` adds more).
- ``DIR/clients/NAME/`` — what one client needs: ``client.key`` and ``client.key_secret``
  (its own pair) and ``cluster.key`` (the cluster's public key, to check the nodes).

Files are ZeroMQ certificates written by ``zmq.auth.create_certificates``; every secret file
is mode 0600 and ``load`` refuses one that others can read. ``load`` tells which kind of
directory it was given: a node must get a ``cluster`` directory (it holds the cluster secret),
a client a ``clients/NAME`` directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from meshq.core.acl import ADMIN, CLUSTER
from meshq.core.acl import CLIENT_NAME as _NAME
from meshq.errors import ConfigError


@dataclass(frozen=True)
class KeySet:
    """Keys one node or client runs with (z85 bytes, as pyzmq takes them)."""

    kind: str  # "cluster" (a storage node's) or "client"
    path: str
    public: bytes  # this process's own pair: the cluster pair for a node, the client pair for a client
    secret: bytes
    cluster_public: bytes
    name: str = ""  # the client's name (the directory name); "" for the cluster

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cluster_public)

    def trusted_keys(self) -> set[bytes]:
        """Public keys accepted from peers: the cluster's and, for a node, every key in ``trusted/`` (read now,
        so a key added while the node runs is accepted from the next connection on)."""
        return set(self.trusted_names())

    def trusted_names(self) -> dict[bytes, str]:
        """``trusted_keys`` with who holds each: ``acl.CLUSTER`` for the cluster key, else the client's name (the
        file's name in ``trusted/`` without ``.key``, as ``keygen --client NAME`` writes it)."""
        names: dict[bytes, str] = {}
        if self.kind == "cluster":
            names.update(_read_trusted(Path(self.path) / "trusted"))
        names[self.cluster_public] = CLUSTER
        return names


def fingerprint(public_key: bytes) -> str:
    """First 16 hex digits of the SHA-256 of a z85 public key: what mDNS records carry (no secret)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def _create(directory: Path, name: str) -> tuple[str, str]:
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret_file, 0o600)
    return public_file, secret_file


def keygen(directory: str | os.PathLike) -> Path:
    """Create a new cluster key set in ``directory`` (which must not hold one); returns ``directory``."""
    root = Path(directory)
    if (root / "cluster").exists() or (root / "clients").exists():
        raise ConfigError(f"{root} already holds a key set (cluster/ or clients/ exists); give an empty or new "
                          f"directory, or `meshq keygen {root} --client NAME` to add a client to it")
    cluster_dir = root / "cluster"
    cluster_dir.mkdir(parents=True)
    os.chmod(cluster_dir, 0o700)
    _create(cluster_dir, "cluster")
    (cluster_dir / "trusted").mkdir()
    add_client(root, ADMIN)
    return root


def add_client(directory: str | os.PathLike, name: str) -> Path:
    """Add ``clients/NAME`` to the key set in ``directory``; its key is trusted by the nodes that read this
    ``cluster/trusted`` (no permission is granted). Returns the client's directory."""
    root = Path(directory)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"client name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    cluster_dir = root / "cluster"
    if not (cluster_dir / "cluster.key").is_file():
        raise ConfigError(f"{root} holds no key set ({cluster_dir / 'cluster.key'} is missing); create one first "
                          f"with `meshq keygen {root}`")
    client_dir = root / "clients" / name
    if client_dir.exists():
        raise ConfigError(f"client {name!r} already exists in {client_dir}; pick another name")
    client_dir.mkdir(parents=True)
    os.chmod(client_dir, 0o700)
    public_file, _secret = _create(client_dir, "client")
    cluster_public = (cluster_dir / "cluster.key").read_text()
    (client_dir / "cluster.key").write_text(cluster_public)
    trusted = cluster_dir / "trusted"
    trusted.mkdir(exist_ok=True)
    (trusted / f"{name}.key").write_text(Path(public_file).read_text())
    return client_dir


def _load_public(path: Path) -> bytes:
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the public key {path}: {exc}") from None
    return public


def _load_pair(path: Path) -> tuple[bytes, bytes]:
    import zmq.auth

    if not path.is_file():
        raise ConfigError(f"the secret key file {path} is missing: this directory is incomplete; copy the whole "
                          f"directory made by `meshq keygen`")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"the secret key file {path} can be read by others (mode {mode:04o}); run "
                          f"`chmod 600 {path}`")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the secret key file {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key; copy the file made by `meshq keygen`")
    return public, secret


def _read_trusted(directory: Path) -> dict[bytes, str]:
    keys: dict[bytes, str] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return keys
    for name in names:
        if name.endswith(".key"):
            try:
                keys[_load_public(directory / name)] = name[:-len(".key")]
            except ConfigError:
                continue  # a half-copied file: ignored until complete
    return keys


def load(path: str | os.PathLike, kind: str) -> KeySet:
    """The keys in ``path``; ``kind`` is "cluster" (a storage node) or "client" (a client node)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"keys directory {directory} does not exist; create a key set with `meshq keygen DIR` "
                          f"and give DIR/cluster to a node, DIR/clients/NAME to a client")
    is_cluster = (directory / "cluster.key").is_file() and (directory / "trusted").is_dir()
    is_client = (directory / "client.key").is_file() or (directory / "client.key_secret").is_file()
    if kind == "cluster":
        if is_client:
            raise ConfigError(f"{directory} is a client's key directory; a storage node needs the cluster's: "
                              f"--keys DIR/cluster")
        if not (directory / "cluster.key").is_file():
            raise ConfigError(f"{directory} is not a cluster key directory (no cluster.key); give the "
                              f"DIR/cluster made by `meshq keygen DIR`")
        public, secret = _load_pair(directory / "cluster.key_secret")
        return KeySet("cluster", str(directory), public, secret, public)
    if is_cluster and not is_client:
        raise ConfigError(f"{directory} is the cluster's key directory; a client needs its own: --keys "
                          f"DIR/clients/NAME (`meshq keygen DIR --client NAME` makes one)")
    if not (directory / "client.key").is_file() and not (directory / "client.key_secret").is_file():
        raise ConfigError(f"{directory} is not a client key directory (no client.key); give DIR/clients/NAME "
                          f"made by `meshq keygen DIR --client NAME`")
    if not (directory / "cluster.key").is_file():
        raise ConfigError(f"{directory / 'cluster.key'} (the cluster's public key) is missing; copy the whole "
                          f"client directory made by `meshq keygen`")
    public, secret = _load_pair(directory / "client.key_secret")
    return KeySet("client", str(directory), public, secret, _load_public(directory / "cluster.key"),
                  name=directory.name)


__all__ = ["ADMIN", "KeySet", "add_client", "fingerprint", "keygen", "load"]
