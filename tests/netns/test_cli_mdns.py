"""A CLI client on one "host" (network namespace) finds the nodes on the others by mDNS alone and advertises its
own namespace address, so that peers can reach it (issue #16 item 1). Skipped unless root with iproute2."""

from __future__ import annotations

import json
import time

import pytest

from tests.netns.lab import can_use_netns

pytestmark = [pytest.mark.skipif(not can_use_netns(), reason="network-namespace tests need root and iproute2 (ip netns)"),
              pytest.mark.timeout(240)]


def test_cli_client_in_another_namespace_finds_nodes_by_mdns_and_advertises_its_address(lab):
    h1, h2, h3 = lab.hosts
    nodes = [lab.start_node(h1), lab.start_node(h2)]
    ids = {n.node_id for n in nodes}
    deadline = time.monotonic() + 60
    while True:
        result = h3.meshq("status", "--json", "--cluster", lab.cluster, "--interface", h3.address)
        status = json.loads(result.stdout) if result.returncode == 0 else None
        storage = {m["node_id"] for m in status["members"] if m["role"] == "storage" and m["state"] == "alive"} \
            if status else set()
        if storage == ids:
            break
        assert time.monotonic() < deadline, f"status from {h3.netns} never listed {ids}: {result.stderr.decode()}"
        time.sleep(0.5)
    clients = [m for m in status["members"] if m["role"] == "client" and m["state"] == "alive"]
    assert [c["address"].rsplit(":", 1)[0] for c in clients] == [f"tcp://{h3.address}"], clients

    # --advertise names the address outright
    result = h3.meshq("status", "--json", "--cluster", lab.cluster, "--interface", h3.address,
                      "--advertise", h3.address)
    assert result.returncode == 0, result.stderr.decode()
    clients = [m for m in json.loads(result.stdout)["members"] if m["role"] == "client" and m["state"] == "alive"]
    assert [c["address"].rsplit(":", 1)[0] for c in clients] == [f"tcp://{h3.address}"], clients

