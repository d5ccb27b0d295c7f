"""`meshq consume --group G --shared` as a user runs it (a real node process on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest

from tests.procs import NodeProcess, run_cli

pytestmark = pytest.mark.timeout(180)


def connection(node: NodeProcess) -> list[str]:
    return ["--cluster", node.cluster, "--seed", node.seed, "--no-mdns"]


def test_consume_shared_acks_what_it_printed_and_gives_back_the_rest(node_processes):
    node = node_processes("n1")
    run_cli("produce", "work", "--acks", "leader", "--partition", "0", *connection(node),
            input_bytes=b"".join(b"%d\n" % i for i in range(20)))
    first = run_cli("consume", "work", "--group", "w", "--shared", "--max", "5", "--timeout", "3", *connection(node))
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout.decode().split() == [str(i) for i in range(5)]
    second = run_cli("consume", "work", "--group", "w", "--shared", "--timeout", "3", *connection(node))
    assert sorted(int(v) for v in second.stdout.decode().split()) == list(range(5, 20)), \
        "acked records are not printed again; the ones the first run held but did not print are"
    status = json.loads(run_cli("status", "--json", *connection(node)).stdout)
    (group,) = [g for g in status["groups"] if g["group"] == "w"]
    assert group["mode"] == "shared"
    assert sum(p["acked"] for p in group["partitions"]) == 20
    assert all(p["lag"] == 0 and p["in_flight"] == 0 for p in group["partitions"])
    text = run_cli("status", *connection(node)).stdout.decode()
    assert "shared groups" in text and any(line.split()[:2] == ["w", "work/0"] for line in text.splitlines()), text


def test_consume_shared_without_a_group_is_a_usage_error(node_processes):
    node = node_processes("n1")
    result = run_cli("consume", "work", "--shared", "--timeout", "1", *connection(node))
    assert result.returncode == 2 and "--shared needs --group" in result.stderr.decode()
