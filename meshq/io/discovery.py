"""mDNS / DNS-SD discovery with zeroconf: announce this node, report peers to the core.

Each node registers ``<node_id>._meshq._tcp.local.`` with TXT records (cluster, node id,
protocol version, role, ROUTER and PUB ports, incarnation) and browses for the others.
Peers of another cluster name or protocol version are ignored here. Every accepted peer
becomes a ``PeerDiscovered`` input of the core (submitted to the runtime thread); from
there on the mesh's own heartbeats and gossip take over, so discovery only has to
introduce nodes once.

``interfaces`` pins zeroconf to those addresses (tests and demos always pin it to
127.0.0.1 or a namespace's address). With ``interfaces=None`` zeroconf uses every
interface, and the set of IPv4 addresses is re-checked every ``rescan_interval_s``: when
it changes, zeroconf is restarted so interfaces that come and go are picked up.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from meshq.config import PROTOCOL_VERSION
from meshq.core.events import PeerDiscovered

log = logging.getLogger("meshq.discovery")

SERVICE_TYPE = "_meshq._tcp.local."


def local_ipv4_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces (via ifaddr, a zeroconf dependency)."""
    import ifaddr

    out = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.add(ip.ip)
    return sorted(out)


def parse_service(properties: dict, addresses: list[str], cluster: str) -> dict | None:
    """Member info from a service's TXT records, or None when it is not a peer of ours."""
    def text(key: str) -> str | None:
        value = properties.get(key.encode())
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else None

    if text("cluster") != cluster or text("proto") != str(PROTOCOL_VERSION):
        return None
    node_id, role = text("node_id"), text("role")
    port, pub_port, incarnation = text("port"), text("pub_port"), text("incarnation")
    if not node_id or role not in ("storage", "client") or not addresses:
        return None
    if not (port and port.isdigit() and pub_port and pub_port.isdigit() and incarnation and incarnation.isdigit()):
        return None
    host = addresses[0]
    return {"node_id": node_id, "address": f"tcp://{host}:{port}", "pub_address": f"tcp://{host}:{pub_port}",
            "role": role, "incarnation": int(incarnation)}


class Discovery:
    """Announces this node and feeds discovered peers to the runtime."""

    def __init__(self, runtime: Any, cluster: str, node_id: str, role: str, endpoint: str, pub_endpoint: str,
                 incarnation: int, interfaces: tuple[str, ...] | None, rescan_interval_s: float = 5.0) -> None:
        self.runtime = runtime
        self.cluster = cluster
        self.node_id = node_id
        self.role = role
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.pub_port = int(pub_endpoint.rsplit(":", 1)[1])
        self.advertised_host = endpoint.rsplit(":", 1)[0].removeprefix("tcp://")
        self.incarnation = incarnation
        self.interfaces = interfaces
        self.rescan_interval_s = rescan_interval_s
        self.ignored = 0
        self._zeroconf: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._addresses: list[str] = []

    def _announce_addresses(self) -> list[str]:
        if self.advertised_host not in ("0.0.0.0", "*", ""):
            return [self.advertised_host]
        return [a for a in (self.interfaces or local_ipv4_addresses())]

    def start(self) -> None:
        self._open()
        if self.interfaces is None:
            self._watcher = threading.Thread(target=self._watch_interfaces, name=f"meshq-mdns-{self.node_id}",
                                             daemon=True)
            self._watcher.start()

    def _open(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

        interfaces = list(self.interfaces) if self.interfaces is not None else None
        self._addresses = local_ipv4_addresses() if interfaces is None else list(interfaces)
        if interfaces is None:
            zeroconf = Zeroconf(ip_version=IPVersion.V4Only)
        else:
            zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        properties = {"cluster": self.cluster, "node_id": self.node_id, "proto": str(PROTOCOL_VERSION),
                      "role": self.role, "port": str(self.port), "pub_port": str(self.pub_port),
                      "incarnation": str(self.incarnation)}
        info = ServiceInfo(SERVICE_TYPE, f"{self.node_id}.{SERVICE_TYPE}",
                           addresses=[socket.inet_aton(a) for a in self._announce_addresses()],
                           port=self.port, properties=properties, server=f"{self.node_id}.local.")
        with self._lock:
            self._zeroconf, self._info = zeroconf, info
        # Registration sends announcements for ~0.5 s; do it off the caller's thread.
        threading.Thread(target=self._register, args=(zeroconf, info), name=f"meshq-mdns-reg-{self.node_id}",
                         daemon=True).start()
        self._browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def _register(self, zeroconf: Any, info: Any) -> None:
        try:
            # Node ids are unique, so probing for name conflicts buys nothing but 1.2 s.
            zeroconf.register_service(info, cooperating_responders=True)
        except Exception as exc:  # zeroconf raises its own error types; never kill the node for it
            if not self._stop.is_set():
                log.warning("mDNS registration of %s failed: %s", self.node_id, exc)

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated) or self._stop.is_set():
            return
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=1500)
        except Exception as exc:  # resolution can fail while zeroconf shuts down
            log.debug("could not resolve %s: %s", name, exc)
            return
        if info is None:
            return
        member = parse_service(info.properties or {}, info.parsed_addresses(), self.cluster)
        if member is None:
            self.ignored += 1
            log.debug("ignoring mDNS service %s (another cluster or version)", name)
            return
        if member["node_id"] != self.node_id:
            self.runtime.submit(PeerDiscovered(member))

    def _watch_interfaces(self) -> None:
        while not self._stop.wait(self.rescan_interval_s):
            current = local_ipv4_addresses()
            if current != self._addresses:
                log.info("network interfaces changed (%s -> %s); restarting mDNS", self._addresses, current)
                self._close()
                if not self._stop.is_set():
                    self._open()

    def _close(self) -> None:
        with self._lock:
            zeroconf, info, self._zeroconf, self._info = self._zeroconf, self._info, None, None
        if zeroconf is None:
            return
        try:
            if self._browser is not None:
                self._browser.cancel()
            if info is not None:
                zeroconf.unregister_service(info)
        except Exception as exc:  # best effort on the way out
            log.debug("mDNS unregister failed: %s", exc)
        finally:
            zeroconf.close()

    def stop(self) -> None:
        self._stop.set()
        self._close()
        if self._watcher is not None:
            self._watcher.join(2.0)
