"""CurveZMQ for a node's sockets: the ZAP handler that decides who may connect, and the peers' server keys.

Theory of operation
-------------------
With keys (``meshq.keys.KeySet``) every socket a node opens is CURVE. Server sockets (ROUTER,
PUB) use the node's own pair: a storage node's is the cluster pair, a client's its client
pair. Client sockets (DEALER, SUB) use the node's own pair as client key and, as server key,
the key of the node they connect to: the cluster key, unless the peer is known to be a client
with a key of its own (learnt from the ZAP user id of what it sent us: ``Curve.learn``).

Authentication is ``zmq.auth.thread.ThreadAuthenticator`` (ZAP) on the node's own context,
with a callback: a client key is accepted when it is trusted now (``KeySet.trusted_keys``
reads ``cluster/trusted`` at every handshake, so a key added while the node runs is accepted
without a restart). A refused peer is logged once (with its address) and counted.
"""

from __future__ import annotations

import logging
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator

from meshq.keys import KeySet

log = logging.getLogger("meshq.auth")


class _Authenticator(ThreadAuthenticator):
    """``ThreadAuthenticator`` that remembers the address of the request being checked (for the log)."""

    address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) > 3:
            self.address = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)


class Curve:
    """A node's CURVE settings and ZAP handler (one per node, on the node's own context)."""

    def __init__(self, keys: KeySet, context: zmq.Context) -> None:
        self.keys = keys
        self.context = context
        self.refused = 0  # keys refused by ZAP (the runtime adds them to the ``auth_refused`` counter)
        self._refused_logged: set[tuple[str, bytes]] = set()
        self._lock = threading.Lock()
        self._peer_keys: dict[str, bytes] = {}  # node id -> its server key, when not the cluster key
        self._endpoint_peer: dict[str, str] = {}  # ROUTER and PUB endpoint -> node id
        self._auth: _Authenticator | None = None

    def start(self) -> None:
        auth = _Authenticator(self.context, log=logging.getLogger("meshq.auth.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=self)
        self._auth = auth

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # called by zmq.auth on its thread, for every CURVE handshake
    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys.trusted_keys():
            return True
        address = self._auth.address if self._auth is not None else "?"
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

    def key_of(self, peer: str) -> bytes:
        return self._peer_keys.get(peer, self.keys.cluster_public)

    def key_at(self, endpoint: str | None) -> bytes:
        """The server key of whatever listens at ``endpoint`` (the cluster key unless known otherwise)."""
        peer = self._endpoint_peer.get(endpoint or "")
        return self.key_of(peer) if peer is not None else self.keys.cluster_public

    def note_endpoint(self, peer: str, endpoint: str) -> None:
        self._endpoint_peer[endpoint] = peer

    def setup(self, sock: zmq.Socket, kind: int, endpoint: str | None = None) -> None:
        if kind in (zmq.ROUTER, zmq.PUB):
            self.server(sock)
        else:
            self.client(sock, self.key_at(endpoint))

    def learn(self, peer: str, user_id: str) -> bool:
        """Record the key a peer authenticated with (a client's own); True when it changed."""
        key = user_id.encode("ascii", "replace")
        if key == self.keys.cluster_public:
            return self._peer_keys.pop(peer, None) is not None
        if self._peer_keys.get(peer) == key:
            return False
        self._peer_keys[peer] = key
        return True


__all__ = ["Curve"]
