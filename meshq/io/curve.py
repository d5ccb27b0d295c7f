"""CurveZMQ for a node's sockets: the ZAP handler that decides who may connect, and the peers' server keys.

Theory of operation
-------------------
With keys (``meshq.keys.KeySet``) every socket a node opens is CURVE. Server sockets (ROUTER,
PUB) use the node's own pair: a storage node's is the cluster pair, a client's its client
pair. Client sockets (DEALER, SUB) use the node's own pair as client key and, as server key,
the key of the node they connect to: the cluster key, or for a client node the key it gossips
in its member info (``wire.MEMBER_INFO`` ``key``; the runtime looks it up at connect time).

Authentication is ``zmq.auth.thread.ThreadAuthenticator`` (ZAP) on the node's own context,
with a callback: a client key is accepted when it is trusted now (``KeySet.trusted_keys``
reads ``cluster/trusted`` at every handshake, so a key added while the node runs is accepted
without a restart). A client node (which holds no ``trusted/``) accepts the cluster key and
the keys of the client members the cluster told it about (``member_keys``). A refused key is
logged once per (address, key) and counted; a peer whose handshake fails before ZAP (plain
against CURVE, or another cluster's server key) is counted and logged by the runtime.

The ZAP reply also carries the accepted key itself, as the connection's metadata property
``KEY_PROPERTY`` (z85): every message from that connection carries it, and the keyed PUB
(``meshq.io.xpub``) judges a subscription by it (the ``User-Id`` is the key's holder's name).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from meshq.core.acl import KEY_PREFIX
from meshq.keys import KeySet

log = logging.getLogger("meshq.auth")
KEY_PROPERTY = "X-Curve-Key"  # metadata of an accepted connection: its CURVE public key, z85 (module docstring)
_ZAP_VERSION = b"1.0"
_MEMBER_WAIT_STEP_S = 0.05
_MEMBER_WAIT_STEPS = 60  # a client waits up to 3 s for an unknown key to be gossiped before refusing it


class _Authenticator(ThreadAuthenticator):
    """``ThreadAuthenticator`` that remembers the address of the request being checked (for the log), names an
    accepted key's holder as the connection's ZAP ``User-Id`` (``identify``), and hands the key itself back as
    the connection's ``KEY_PROPERTY``. (Requests are handled one at a time, on the ZAP thread.)"""

    address = ""
    identify: Any = None
    _key = b""  # the CURVE key of the request being checked (raw, 32 bytes), b"" for another mechanism

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.identify(z85.encode(client_public_key))

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) > 3:
            self.address = msg[3].decode("utf-8", "replace")
        self._key = msg[6] if len(msg) == 7 and msg[5] == b"CURVE" and len(msg[6]) == 32 else b""
        try:
            await super().handle_zap_message(msg)
        finally:
            self._key = b""

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        """The ZAP reply (RFC 27), with ``KEY_PROPERTY`` in its metadata when a CURVE key was accepted."""
        accepted = status_code == b"200"
        metadata = zap_key_metadata(self._key) if accepted and self._key else b""
        self.zap_socket.send_multipart([_ZAP_VERSION, request_id, status_code, status_text,
                                        user_id.encode("utf-8", "replace") if accepted else b"", metadata])


def zap_key_metadata(key: bytes) -> bytes:
    """ZAP reply metadata (ZMTP properties: name length, name, 4-byte value length, value) naming ``key``."""
    name, value = KEY_PROPERTY.encode("ascii"), z85.encode(key)
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


class Curve:
    """A node's CURVE settings and ZAP handler (one per node, on the node's own context)."""

    def __init__(self, keys: KeySet, context: zmq.Context) -> None:
        self.keys = keys
        self.context = context
        self.refused = 0  # keys refused by ZAP (the runtime adds them to the ``auth_refused`` counter)
        self._refused_logged: set[tuple[str, bytes]] = set()
        self._lock = threading.Lock()
        self._names: dict[bytes, str] = {}  # trusted key -> holder, as last read (ZAP thread only)
        self._endpoint_keys: dict[str, bytes] = {}  # ROUTER endpoint -> the key it listens with
        self._auth: _Authenticator | None = None
        self.member_keys: Any = None  # () -> set of client members' keys (set by the runtime)

    def start(self) -> None:
        auth = _Authenticator(self.context, log=logging.getLogger("meshq.auth.zap"))
        auth.identify = self.identify
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=self)
        self._auth = auth

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # called by zmq.auth on its thread, for every CURVE handshake
    def callback(self, domain: str, key: bytes) -> Any:
        names = self.keys.trusted_names()
        if key in names:
            self._names = names  # read by identify, next on this thread for this same handshake
            return True
        address = self._auth.address if self._auth is not None else "?"
        if self.keys.kind == "client" and self.member_keys is not None:
            # A client may hear from another client before the cluster told it about that one: wait a moment
            # for the gossip (a refused peer never retries: libzmq gives up after a ZAP refusal).
            return self._await_member(key, address)
        return self._refuse(key, address)

    def identify(self, key: bytes) -> str:
        """The ZAP ``User-Id`` of an accepted z85 ``key`` (on the ZAP thread, right after ``callback``): the client
        name its file has in ``trusted/``, ``acl.CLUSTER`` for the cluster key, else ``@key:`` and the key (a
        client member a client node accepted: it holds no grants, client nodes check none)."""
        return self._names.get(key) or KEY_PREFIX + key.decode("ascii", "replace")

    async def _await_member(self, key: bytes, address: str) -> bool:
        for _ in range(_MEMBER_WAIT_STEPS):
            if key in self.member_keys():
                return True
            await asyncio.sleep(_MEMBER_WAIT_STEP_S)
        return key in self.member_keys() or self._refuse(key, address)

    def _refuse(self, key: bytes, address: str) -> bool:
        with self._lock:
            self.refused += 1
            first = (address, key) not in self._refused_logged
            if first and len(self._refused_logged) < 10_000:
                self._refused_logged.add((address, key))
        if first:
            log.warning("refused a connection from %s: its CURVE key %s is not trusted by this node (add its public "
                        "key with `meshq keygen DIR --client NAME` and copy it to cluster/trusted/)",
                        address, key.decode("ascii", "replace"))
        return False

    # ------------------------------------------------------------------ sockets
    def server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket, server_key: bytes | None = None) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = server_key or self.keys.cluster_public

    def key_at(self, endpoint: str | None) -> bytes:
        """The server key of whatever listens at ``endpoint``: the cluster key unless the runtime noted another."""
        return self._endpoint_keys.get(endpoint or "", self.keys.cluster_public)

    def note_endpoint(self, peer: str, endpoint: str, key: bytes) -> None:
        """The ROUTER at ``endpoint`` (of node ``peer``) listens with ``key`` (read from other threads)."""
        self._endpoint_keys[endpoint] = key

    def setup(self, sock: zmq.Socket, kind: int, endpoint: str | None = None) -> None:
        if kind in (zmq.ROUTER, zmq.PUB, zmq.XPUB):
            self.server(sock)
        else:
            self.client(sock, self.key_at(endpoint))


__all__ = ["KEY_PROPERTY", "Curve", "zap_key_metadata"]
