"""How a CLI command reaches its cluster: the connection options turned into a started client ``Node``.

Theory of operation
-------------------
With ``--seed`` (or ``MESHQ_SEEDS``) the client greets those seeds, as it always did. Without
one, and with mDNS on (the default), it first browses ``_meshq._tcp.local.`` on the
``--interface`` addresses (``MESHQ_INTERFACES``; default every interface) for the storage
nodes of ``--cluster`` (``meshq.io.discovery.find_cluster``) and greets what answered; the
mesh's gossip introduces the others. Nothing answering within ``DISCOVERY_TIMEOUT_S`` is one
line naming the interfaces and cluster searched, and any other cluster heard instead.

The client binds and advertises the local address of the interface through which it reaches
the first node (127.0.0.1 when that node is on loopback), or ``--advertise HOST``: its peers
must be able to connect back to it. When the command ends, ``Node.stop`` says goodbye, so the
client leaves the members' tables at once.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from meshq.cli.parser import _env_list, _seed
from meshq.config import parse_host_port
from meshq.errors import ConfigError, MeshqError, NoRespondersError

# How long a command browses mDNS before it says nothing answered, and how long it then waits for one of the
# nodes found (or a seed) to answer its hello before saying so: "a few seconds", not a command's --timeout.
DISCOVERY_TIMEOUT_S = 3.0
REACH_TIMEOUT_S = 5.0


def seeds_of(args: argparse.Namespace) -> list[str]:
    """``--seed`` values, else ``MESHQ_SEEDS``."""
    seeds = args.seed if args.seed is not None else [_seed(s) for s in _env_list("MESHQ_SEEDS")]
    return list(seeds)


def interfaces_of(args: argparse.Namespace) -> list[str] | None:
    """``--interface`` values, else ``MESHQ_INTERFACES``; None: every interface."""
    values = args.interface if args.interface is not None else _env_list("MESHQ_INTERFACES")
    return list(values) or None


def keys_of(args: argparse.Namespace) -> str | None:
    """``--keys`` (a client key directory), else ``MESHQ_KEYS``; None: no CURVE."""
    return getattr(args, "keys", None) or os.environ.get("MESHQ_KEYS") or None


def _keys_hint(args: argparse.Namespace) -> str:
    keys = keys_of(args)
    if keys:
        return (f"a cluster answers only keys it trusts: check that --keys {keys} was made by that cluster's `meshq "
                f"keygen` and that its public key is in cluster/trusted/ on the nodes")
    return "a cluster started with --keys answers only clients with keys it trusts: give --keys DIR/clients/NAME"


def check_reachable_somehow(args: argparse.Namespace) -> None:
    """A usage error when the options leave no way to find the cluster (``--no-mdns`` and no seed)."""
    if args.no_mdns and not seeds_of(args):
        raise ConfigError("--no-mdns leaves no way to find the cluster: give --seed HOST:PORT (or MESHQ_SEEDS) "
                          "naming a running `meshq node`, or drop --no-mdns to find it by mDNS")


class Connection:
    """Where a client command found its cluster: seeds given or nodes found by mDNS, and its own address."""

    def __init__(self, cluster: str, seeds: list[str], found_by_mdns: bool, interfaces: list[str] | None,
                 discovery_s: float) -> None:
        self.cluster = cluster
        self.seeds = seeds
        self.found_by_mdns = found_by_mdns
        self.interfaces = interfaces
        self.discovery_s = discovery_s

    def tried(self) -> str:
        how = "found by mDNS" if self.found_by_mdns else "given as seeds"
        return f"{', '.join(self.seeds)} ({how})"


def find(args: argparse.Namespace, discovery_timeout_s: float = DISCOVERY_TIMEOUT_S) -> Connection:
    """Seeds to greet: the given ones, or the storage nodes of ``--cluster`` that answered mDNS."""
    check_reachable_somehow(args)
    seeds = seeds_of(args)
    interfaces = interfaces_of(args)
    if seeds:
        return Connection(args.cluster, seeds, False, interfaces, 0.0)
    from meshq.io.discovery import find_cluster

    keys = keys_of(args)
    fingerprint = ""
    if keys is not None:
        from meshq.keys import load

        fingerprint = load(keys, "client").fingerprint
    found = find_cluster(args.cluster, interfaces, timeout_s=discovery_timeout_s, fingerprint=fingerprint)
    if not found.nodes:
        raise NoRespondersError(found.nothing_found_message())
    addresses = [node["address"].removeprefix("tcp://") for node in found.nodes]
    return Connection(args.cluster, addresses, True, interfaces, found.seconds)


def own_address(args: argparse.Namespace, seeds: list[str]) -> tuple[str, str | None]:
    """(host to bind, host to advertise or None): ``--advertise``, else the local address towards the first seed."""
    from meshq.io.discovery import local_address_towards, local_ipv4_addresses

    advertise = getattr(args, "advertise", None)
    if advertise:
        if advertise in local_ipv4_addresses():
            return advertise, None
        return "0.0.0.0", advertise  # e.g. a NAT's outside address: listen everywhere, tell peers that one
    host, _port = parse_host_port(seeds[0])
    return local_address_towards(host), None


def start_client(args: argparse.Namespace, reach_timeout_s: float = REACH_TIMEOUT_S,
                 discovery_timeout_s: float = DISCOVERY_TIMEOUT_S) -> Any:
    """A started client ``Node`` that a storage node of the cluster has answered; ``MeshqError`` saying what was
    tried when none did."""
    from meshq.node import Node

    connection = find(args, discovery_timeout_s)
    bind_host, advertised = own_address(args, connection.seeds)
    options: dict[str, Any] = {"advertised_host": advertised} if advertised else {}
    # Nodes found by mDNS are greeted as seeds: no second browse, and no announcement of a short-lived client.
    mdns = not args.no_mdns and not connection.found_by_mdns
    node = Node(cluster=args.cluster, host=bind_host, seeds=connection.seeds, mdns=mdns,
                interfaces=connection.interfaces, role="client", keys=keys_of(args), **options)
    node.start()
    started_s = time.monotonic()
    try:
        node.wait_ready(timeout=reach_timeout_s)
    except MeshqError as exc:
        node.stop()
        if not exc.retriable and not isinstance(exc, NoRespondersError):
            raise
        raise NoRespondersError(
            f"no storage node of cluster {args.cluster!r} answered within {time.monotonic() - started_s:.1f} s at "
            f"{connection.tried()}: check that `meshq node --cluster {args.cluster}` runs there and that this host "
            f"can reach it (a node of another cluster does not answer; {_keys_hint(args)})") from None
    except BaseException:
        node.stop()
        raise
    return node
