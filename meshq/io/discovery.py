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

Only storage nodes announce themselves; a client browses (peers learn of it from its
``hello``). ``find_cluster`` is the one-shot browse of a CLI command: it returns the storage
nodes of one cluster that answered within a few seconds, and the other clusters it heard, so
that "nothing answered" can say what was searched and what was found instead.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from meshq.config import PROTOCOL_VERSION
from meshq.core.events import PeerDiscovered
from meshq.errors import ConfigError

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


def check_interfaces(interfaces: list[str] | tuple[str, ...] | None) -> None:
    """Raise ``ConfigError`` (one line, naming the flag) for an mDNS interface that is not an IPv4
    address of this host: zeroconf would otherwise fail deep inside with a socket error."""
    if not interfaces:
        return
    present = local_ipv4_addresses()
    for address in interfaces:
        if address not in present:
            raise ConfigError(f"--interface {address}: not an IPv4 address of this host (its addresses: "
                              f"{', '.join(present) or 'none'}); give one of them, or --no-mdns with --seed HOST:PORT")


def open_zeroconf(interfaces: list[str] | tuple[str, ...] | None, unicast: bool = False, kind: Any = None) -> Any:
    """A ``Zeroconf`` on ``interfaces`` (None: every interface), IPv4 only; ``ConfigError`` when the
    interfaces are wrong or multicast cannot be used there. ``unicast``: query from a port of its own
    instead of 5353, so that responders answer it directly (see ``find_cluster``). ``kind``:
    ``zeroconf.asyncio.AsyncZeroconf`` for one that runs on the calling event loop."""
    from zeroconf import IPVersion, Zeroconf

    kind = kind or Zeroconf
    check_interfaces(interfaces)
    where = ", ".join(interfaces) if interfaces else "every interface"
    try:
        if interfaces is None:
            return kind(ip_version=IPVersion.V4Only, unicast=unicast)
        return kind(interfaces=list(interfaces), ip_version=IPVersion.V4Only, unicast=unicast)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot start mDNS on {where} ({exc}); give another --interface, or --no-mdns with "
                          f"--seed HOST:PORT") from None


def _txt(properties: dict, key: str) -> str | None:
    value = properties.get(key.encode())
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else None


def parse_service(properties: dict, addresses: list[str], cluster: str, fingerprint: str = "") -> dict | None:
    """Member info from a service's TXT records, or None when it is not a peer of ours: another cluster or
    version, or another cluster key (``fingerprint``: ``meshq.keys.fingerprint`` of the cluster public key, ""
    without keys; a node without keys announces none)."""
    def text(key: str) -> str | None:
        return _txt(properties, key)

    if text("cluster") != cluster or text("proto") != str(PROTOCOL_VERSION):
        return None
    if (text("key") or "") != fingerprint:
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
                 incarnation: int, interfaces: tuple[str, ...] | None, rescan_interval_s: float = 5.0,
                 fingerprint: str = "") -> None:
        self.runtime = runtime
        self.fingerprint = fingerprint  # of the cluster key (no secret): peers with another key are ignored
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

    def service_info(self) -> Any:
        """This storage node's ``ServiceInfo``: TXT records with no secret (the key's fingerprint only)."""
        from zeroconf import ServiceInfo

        properties = {"cluster": self.cluster, "node_id": self.node_id, "proto": str(PROTOCOL_VERSION),
                      "role": self.role, "port": str(self.port), "pub_port": str(self.pub_port),
                      "incarnation": str(self.incarnation)}
        if self.fingerprint:
            properties["key"] = self.fingerprint
        return ServiceInfo(SERVICE_TYPE, f"{self.node_id}.{SERVICE_TYPE}",
                           addresses=[socket.inet_aton(a) for a in self._announce_addresses()],
                           port=self.port, properties=properties, server=f"{self.node_id}.local.")

    def accept(self, name: str, info: Any) -> None:
        """A resolved service (``info``: a ``ServiceInfo``, or None when it did not resolve): feed it to the
        runtime when it is a peer of ours, count it as ignored otherwise."""
        if info is None:
            return
        member = parse_service(info.properties or {}, info.parsed_addresses(), self.cluster, self.fingerprint)
        if member is None:
            self.ignored += 1
            log.debug("ignoring mDNS service %s (another cluster, version or cluster key)", name)
            return
        if member["node_id"] != self.node_id:
            self.runtime.submit(PeerDiscovered(member))

    def _open(self) -> None:
        from zeroconf import ServiceBrowser

        interfaces = list(self.interfaces) if self.interfaces is not None else None
        self._addresses = local_ipv4_addresses() if interfaces is None else list(interfaces)
        zeroconf = open_zeroconf(interfaces)
        if self.role != "storage":
            # A client has nothing to offer to a node that finds it: it introduces itself with hello.
            with self._lock:
                self._zeroconf, self._info = zeroconf, None
            self._browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[self._on_change])
            return
        info = self.service_info()
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
        self.accept(name, info)

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


@dataclass
class Found:
    """What a ``find_cluster`` browse heard: the storage nodes of the cluster searched, and other clusters."""

    cluster: str
    interfaces: tuple[str, ...] | None
    nodes: list[dict] = field(default_factory=list)  # parse_service() dicts, storage nodes only
    other_clusters: dict[str, list[str]] = field(default_factory=dict)  # cluster -> node ids
    other_keys: list[str] = field(default_factory=list)  # node ids of this cluster name with another key (or none)
    seconds: float = 0.0

    def where(self) -> str:
        return ", ".join(self.interfaces) if self.interfaces else "every interface"

    def nothing_found_message(self) -> str:
        """One line for a person: what was searched, for how long, and what answered instead."""
        text = (f"no storage node of cluster {self.cluster!r} answered mDNS ({SERVICE_TYPE}) on {self.where()} "
                f"within {self.seconds:.1f} s")
        if self.other_keys:
            text = (f"{text}; nodes of that cluster name with another cluster key (or without keys) answered and were "
                    f"ignored: {', '.join(sorted(self.other_keys))}: give the --keys of that cluster (or none)")
        if self.other_clusters:
            heard = "; ".join(f"cluster {name!r} ({', '.join(sorted(ids))})"
                              for name, ids in sorted(self.other_clusters.items()))
            return f"{text}; nodes of another cluster answered: {heard}: give --cluster NAME to use one"
        return (f"{text}: check that a `meshq node --cluster {self.cluster}` runs on that network, give --interface "
                f"IP of the interface that reaches it, or --seed HOST:PORT")


def find_cluster(cluster: str, interfaces: list[str] | tuple[str, ...] | None, timeout_s: float = 3.0,
                 settle_s: float = 0.1, fingerprint: str = "") -> Found:
    """Browse ``_meshq._tcp.local.`` for the storage nodes of ``cluster``: return ``settle_s`` after the first
    one answered (the mesh's gossip introduces the rest), or after ``timeout_s`` with whatever was heard."""
    from zeroconf import ServiceBrowser, ServiceStateChange

    started_s = time.monotonic()
    found = Found(cluster, tuple(interfaces) if interfaces else None)
    names: queue.Queue[str] = queue.Queue()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put(name)

    # A query from a port other than 5353 is a "one-shot" query (RFC 6762 §5.1): responders answer it at once by
    # unicast. From port 5353 the answer is multicast, and held back up to a second when the record was multicast
    # in the last second (§14), which on a busy LAN (or loopback shared by several nodes) is most of the time.
    zeroconf = open_zeroconf(interfaces, unicast=True)
    browser = None
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[on_change])
        deadline_s = started_s + timeout_s
        seen: set[str] = set()
        first_s = 0.0
        while True:
            now_s = time.monotonic()
            if found.nodes:
                deadline_s = min(deadline_s, first_s + settle_s)
            if now_s >= deadline_s:
                break
            try:
                name = names.get(timeout=deadline_s - now_s)
            except queue.Empty:
                break
            if name in seen:
                continue
            info = zeroconf.get_service_info(SERVICE_TYPE, name, timeout=int(max(0.05, deadline_s - now_s) * 1000))
            if info is None:
                continue  # not resolved in time; an Updated event may bring it back
            seen.add(name)
            properties = info.properties or {}
            member = parse_service(properties, info.parsed_addresses(), cluster, fingerprint)
            if member is None and _txt(properties, "cluster") == cluster:
                found.other_keys.append(_txt(properties, "node_id") or name.split(".")[0])
            if member is not None and member["role"] == "storage":
                if not found.nodes:
                    first_s = time.monotonic()
                found.nodes.append(member)
            elif member is None and _txt(properties, "cluster") not in (None, cluster):
                other = found.other_clusters.setdefault(_txt(properties, "cluster") or "?", [])
                other.append(_txt(properties, "node_id") or name.split(".")[0])
    finally:
        if browser is not None:
            browser.cancel()
        zeroconf.close()
    found.seconds = time.monotonic() - started_s
    return found


def local_address_towards(host: str) -> str:
    """The local IPv4 address this host would send from to reach ``host`` (no packet is sent)."""
    try:
        target = socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"
    if target.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((target, 9))  # UDP connect only picks a route and a source address
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
