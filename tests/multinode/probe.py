"""Ask ONE meshq node for its own, unmerged view (its ``local_status``).

``meshq status`` and ``Node.status()`` merge the views of every storage node they reach
(members and metadata come from the first answering node in sort order), so they cannot
show what a particular node believes. This probe sends a single ``status`` request over a
raw DEALER socket to one node's ROUTER endpoint, exactly as a peer would, and returns that
node's answer: ``{"node_id", "members", "topics", "metadata": {"voters", "leader", ...}, ...}``.

The public equivalent is ``meshq status --json --node ID`` / ``Node.status(node_id=ID)``
(checked against this probe in ``test_membership.py``); they go through a client node,
which joins the mesh (it shows up in every member list) and needs its own warm-up, so
the tests poll with this probe instead: one short-lived socket per question, nothing
joins, and a killed node's absence is measured without a client's liveness view in the
way. It uses the project's wire codec (``meshq.core.wire``); if the protocol changes,
this is the one place to adapt.

Also runnable as a script (used inside network namespaces)::

    python -m tests.multinode.probe --cluster NAME tcp://10.77.1.1:7000 [more endpoints]

prints one JSON object per endpoint (``{"endpoint", "status"}`` or ``{"endpoint", "error"}``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any

import zmq

from meshq.core import wire

_ids = itertools.count(1)


class ProbeError(Exception):
    """The node did not answer (in time) or answered with an error."""


def node_status(endpoint: str, cluster: str, timeout_s: float = 2.0, keys: str | None = None) -> dict[str, Any]:
    """The local status of the node listening on ``endpoint`` (``tcp://host:port`` or ``host:port``); ``keys``:
    a client key set directory (``DIR/clients/NAME``) when the cluster runs with keys (CURVE)."""
    if not endpoint.startswith("tcp://"):
        endpoint = f"tcp://{endpoint}"
    request_id = next(_ids)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            from meshq.keys import load

            key_set = load(keys, "client")
            sock.curve_secretkey, sock.curve_publickey = key_set.secret, key_set.public
            sock.curve_serverkey = key_set.cluster_public
        sock.connect(endpoint)
        sock.send_multipart(wire.encode(cluster, f"probe-{os.getpid()}", "status", request_id, {}))
        if not sock.poll(int(timeout_s * 1000)):
            raise ProbeError(f"{endpoint} did not answer a status request within {timeout_s} s")
        message = wire.decode(sock.recv_multipart(), cluster)
    finally:
        sock.close(0)
    if message.type != "status_ok":
        raise ProbeError(f"{endpoint} answered {message.type}: {message.body}")
    return message.body["status"]


def try_node_status(endpoint: str, cluster: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    try:
        return node_status(endpoint, cluster, timeout_s)
    except (ProbeError, wire.ProtocolError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--keys", help="client key set directory (DIR/clients/NAME) of a cluster with keys")
    parser.add_argument("endpoints", nargs="+")
    args = parser.parse_args(argv)
    for endpoint in args.endpoints:
        try:
            out: dict[str, Any] = {"endpoint": endpoint, "status": node_status(endpoint, args.cluster, args.timeout, args.keys)}
        except (ProbeError, wire.ProtocolError) as exc:
            out = {"endpoint": endpoint, "error": str(exc)}
        print(json.dumps(out, default=repr), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
