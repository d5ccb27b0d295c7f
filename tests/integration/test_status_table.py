"""`meshq status` for a person: rich tables readable at 80 columns (issues #15, #16).

Nothing cut (no ellipsis, every node id whole on one line, every header whole), no unlabelled
column, under-replicated partitions highlighted, group lag per partition, subscriptions and
services listed. ``--json`` keeps its shape (tests/integration/test_cli.py).
"""

from __future__ import annotations

import copy
import io
import json
import re

import pytest
from rich.console import Console

from meshq.cli.output import render_status
from tests.procs import NodeProcess, run_cli

pytestmark = pytest.mark.timeout(120)

IDS = ["vm-c728bb5a", "vm-1b7982d6", "vm-77c0095d"]
CLIENT = "vm-c728bb5a-0f1e2d3c4b"  # client ids are longer than storage ids


def three_node_status() -> dict:
    """A merged status of three storage members, shaped as `meshq status --json` gives it."""
    def partition(number: int, in_sync: list[str], high_watermark: int, **extra) -> dict:
        return {"partition": number, "leader": IDS[number % 3], "replicas": IDS, "in_sync": in_sync,
                "high_watermark": high_watermark, "learners": [], "target": IDS, "config_version": 0, "epoch": 4,
                "role": "leader", **extra}

    return {
        "cluster": "shop", "node_id": IDS[0], "answered_by": IDS, "handoffs": 1,
        "members": [*({"node_id": i, "address": f"tcp://192.168.100.200:{7450 + k}", "role": "storage",
                       "state": "alive"} for k, i in enumerate(IDS)),
                    {"node_id": CLIENT, "address": "tcp://192.168.100.7:40111", "role": "client", "state": "alive"},
                    {"node_id": "vm-c728bb5a-99999999", "address": "tcp://192.168.100.7:40112", "role": "client",
                     "state": "left"}],
        "topics": [
            {"name": "__consumer_offsets", "partitions": [partition(0, IDS, 7)]},
            {"name": "orders", "partitions": [
                partition(0, IDS, 1200),
                partition(1, IDS[:2], 1187),  # under-replicated
                partition(2, IDS, 1234, target=[IDS[0], IDS[1], "vm-aaaa1111"], learners=["vm-aaaa1111"]),
            ]},
        ],
        "groups": [
            {"group": "billing", "mode": "stream", "generation": 3, "state": "stable",
             "members": [{"member": f"{CLIENT}-1", "topic": "orders", "partitions": [0, 1, 2]}],
             "partitions": [{"topic": "orders", "partition": p, "committed": 1000 + p, "high_watermark": 1200 + p,
                             "lag": 200} for p in range(3)]},
            {"group": "workers", "mode": "shared", "members": [f"{CLIENT}/e0f258a958"],
             "partitions": [{"topic": "orders", "partition": p, "mode": "shared", "committed": 10, "high_watermark": 50,
                             "ack_floor": 10, "lag": 40, "in_flight": 19, "ready": 0, "delayed": 2, "acked": 1,
                             "redelivered": 3, "dead_lettered": 1, "stale_acks": 0} for p in range(2)]},
        ],
        "pubsub": {"nodes": [{"node_id": IDS[1], "peers": [], "subscriptions": [
            {"id": 1, "pattern": "sensors.*.temp", "queue": "dashboards", "delivered": 51234, "dropped": 17},
            {"id": 2, "pattern": "events.>", "queue": None, "delivered": 0, "dropped": 0}]}]},
        "services": [{"service": "resize", "node_id": IDS[2], "in_flight": 3, "served": 812, "errors": 2,
                      "p50_ms": 1.5, "p99_ms": 9.25}],
        "service_instances": {"resize": [IDS[2], CLIENT], "echo": [IDS[0]]},
    }


def rendered(status: dict, width: int = 80) -> tuple[str, str]:
    """(plain text, text with ANSI styles) of ``render_status`` on a terminal ``width`` columns wide."""
    console = Console(width=width, record=True, force_terminal=True, color_system="standard", file=io.StringIO())
    render_status(status, console)
    return console.export_text(clear=False), console.export_text(styles=True)


def tables(text: str) -> dict[str, list[str]]:
    """Each table's lines (title, header lines, rows) by title."""
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        title = re.match(r"^(members|partitions|consumer groups|shared groups|subscriptions|services)\b", line)
        if title:
            current = found.setdefault(title.group(1), [])
        if current is not None:
            current.append(line)
    return found


def test_three_node_status_fits_80_columns_without_cutting_anything():
    text, _ = rendered(three_node_status())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    assert "…" not in text and "..." not in text
    words = set(text.split())
    for node_id in [*IDS, CLIENT, "vm-aaaa1111"]:
        assert node_id in words or f"+{node_id}" in words, f"{node_id} cut or missing"
    assert {"members", "partitions", "consumer groups", "shared groups", "subscriptions", "services"} <= set(
        tables(text))
    for header in ("node id", "address", "role", "state", "topic/part", "leader", "epoch", "replicas", "in sync",
                   "watermark", "committed", "lag", "pattern", "queue group", "delivered", "dropped", "service",
                   "instances", "served", "errors", "flight", "delivered", "letters"):
        assert header in text, header
    assert "__consumer_offsets" not in text  # internal topics: --json only
    assert "vm-c728bb5a-99999999" not in text and "1 client(s) that ended are not listed" in text


def test_every_column_has_a_header():
    status = three_node_status()
    text, _ = rendered(status)
    for title, block in tables(text).items():
        rule = next(i for i, line in enumerate(block) if set(line.strip()) == {"─"})
        headers, first_row = block[1:rule], block[rule + 1]
        # every column that holds text in the first row has header text above it
        for match in re.finditer(r"\S+", first_row):
            column = range(match.start(), match.end())
            assert any(line[i:i + 1].strip() for line in headers for i in column), (title, match.group(), block)


def test_under_replicated_partition_is_highlighted_and_named():
    status = three_node_status()
    text, styled = rendered(status)
    assert "1 partition(s) under-replicated, leaderless or unknown: orders/1 (2 of 3 in sync)" in " ".join(text.split())
    row = next(line for line in styled.splitlines() if "orders/1" in line and "1187" in line)
    assert "\x1b[1;33m" in row  # bold yellow
    healthy = next(line for line in styled.splitlines() if "orders/0" in line and "1200" in line)
    assert "\x1b[1;33m" not in healthy
    leaderless = copy.deepcopy(status)
    leaderless["topics"][1]["partitions"][0]["leader"] = None
    text, styled = rendered(leaderless)
    assert "orders/0 (no leader)" in " ".join(text.split())
    assert "\x1b[1;31m" in next(line for line in styled.splitlines() if "orders/0" in line and "1200" in line)


def test_groups_show_lag_per_partition_and_in_total():
    text, _ = rendered(three_node_status())
    block = tables(text)["consumer groups"]
    rows = [line.split() for line in block if "orders/" in line]
    assert [row[-4:] for row in rows] == [["orders/0", "1000", "1200", "200"], ["orders/1", "1001", "1201", "200"],
                                          ["orders/2", "1002", "1202", "200"]]
    assert next(line for line in block if "total" in line).split()[-1] == "600"
    shared = tables(text)["shared groups"]
    assert next(line for line in shared if "total" in line).split()[-6:] == ["total", "80", "38", "4", "6", "2"]


def test_subscriptions_and_services():
    text, _ = rendered(three_node_status())
    subs = tables(text)["subscriptions"]
    assert ["sensors.*.temp", "dashboards", IDS[1], "51234", "17"] in [line.split() for line in subs]
    assert ["events.>", "-", IDS[1], "0", "0"] in [line.split() for line in subs]
    services = " ".join(" ".join(tables(text)["services"]).split())
    assert f"resize {IDS[2]} 3 812 2 9.25 {CLIENT}" in services
    assert f"echo {IDS[0]} 0 0 0 -" in services


def test_status_command_table_at_80_columns(node_processes, monkeypatch):
    node: NodeProcess = node_processes("n1")
    connection = ["--cluster", node.cluster, "--seed", node.seed, "--no-mdns"]
    produced = run_cli("produce", "orders", "--acks", "leader", *connection,
                       input_bytes=b"".join(b"%d\n" % i for i in range(30)))
    assert produced.returncode == 0, produced.stderr.decode()
    consumed = run_cli("consume", "orders", "--group", "billing", "--max", "10", "--timeout", "3", *connection)
    assert consumed.returncode == 0, consumed.stderr.decode()
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli("status", *connection)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text
    status = run_cli("status", "--json", *connection)
    members = [m["node_id"] for m in json.loads(status.stdout)["members"] if m["role"] == "storage"]
    assert members and all(member in text.split() for member in members)
    groups = tables(text)["consumer groups"]
    assert sum(int(line.split()[-1]) for line in groups if "orders/" in line) == 20  # 30 produced, 10 committed


def test_a_partition_whose_leader_did_not_answer_shows_unknown_not_an_empty_in_sync_set():
    status = three_node_status()
    topic = next(t for t in status["topics"] if not t["name"].startswith("__"))
    topic["partitions"][0]["in_sync"] = None  # as merge_status gives it
    name = topic["name"]
    text, _ = rendered(status)
    flat = " ".join(text.split())
    assert f"{name}/0 (in-sync set unknown: its leader" in flat
    row = next(line for line in text.splitlines() if f"{name}/0" in line)
    assert "unknown" in row


def test_a_node_whose_disk_is_full_is_marked_in_the_members_table():
    status = three_node_status()
    status["members"][1]["storage_full"] = True
    status["members"][0]["storage_full"] = False
    text, styled = rendered(status)
    assert max(len(line) for line in text.splitlines()) <= 80
    members = " ".join(" ".join(tables(text)["members"]).split())
    assert "disk full: refusing writes" in members
    assert members.count("disk full") == 1
    assert "\x1b[31mdisk full" in styled


def test_a_rebuilt_partition_is_named_with_its_start_and_lost_offsets():
    status = three_node_status()
    orders = next(t for t in status["topics"] if t["name"] == "orders")
    orders["partitions"][0]["rebuilt"] = {"epoch": 3, "start_offset": 16777221, "reported_end": 5,
                                          "lost_offsets": [[0, 4]], "unknown_offsets": [[5, 16777220]]}
    text, _ = rendered(status)
    assert ("1 partition(s) rebuilt empty after every replica was removed for good: orders/0 from offset "
            "16777221 (lost: 0..4)") in " ".join(text.split())
    del orders["partitions"][0]["rebuilt"]
    assert "rebuilt" not in rendered(status)[0]
