"""The `meshq` CLI as a user runs it: real processes on 127.0.0.1, kill -9, damaged files."""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.procs import NodeProcess, free_port, run_cli

pytestmark = pytest.mark.timeout(240)


def connection(node: NodeProcess) -> list[str]:
    return ["--cluster", node.cluster, "--seed", node.seed, "--no-mdns"]


def consume_json(node: NodeProcess, topic: str, *extra: str) -> list[dict]:
    result = run_cli("consume", topic, "--json", "--from", "earliest", "--timeout", "3", *extra, *connection(node))
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def segments(data_dir: str, topic: str, partition: int) -> list[str]:
    directory = os.path.join(data_dir, "topics", f"{topic}-{partition}")
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".log"))


def test_100k_records_acknowledged_with_acks_leader_survive_kill_9(node_processes):
    node = node_processes("n1")
    lines = [f"rec-{i:06d}" for i in range(100_000)]
    produced = run_cli("produce", "big", "--acks", "leader", "--json", *connection(node),
                       input_bytes="\n".join(lines).encode() + b"\n")
    assert produced.returncode == 0, produced.stderr.decode()
    acknowledged = [json.loads(line) for line in produced.stdout.decode().splitlines()]
    assert len(acknowledged) == len(lines)
    node.kill()  # kill -9: no clean shutdown, no final fsync
    node.start()
    records = consume_json(node, "big")
    by_position = {(r["partition"], r["offset"]): r["value"] for r in records}
    for line, ack in zip(lines, acknowledged):
        assert by_position.get((ack["partition"], ack["offset"])) == line
    assert len(records) == len(lines)
    per_partition: dict[int, list[int]] = {}
    for r in records:
        per_partition.setdefault(r["partition"], []).append(r["offset"])
    for offsets in per_partition.values():
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), "gap or reorder in a partition"


def test_torn_tail_is_cut_on_restart_and_reported(node_processes):
    node = node_processes("n1")
    produced = run_cli("produce", "torn", "--acks", "leader", "--partition", "0", *connection(node),
                       input_bytes=b"".join(b"value-%d\n" % i for i in range(500)))
    assert produced.returncode == 0, produced.stderr.decode()
    node.kill()
    last = segments(node.data_dir, "torn", 0)[-1]
    size = os.path.getsize(last)
    with open(last, "ab") as f:
        f.write(random.Random(3).randbytes(777))  # a torn write: garbage after the last whole batch
    node.start()
    values = [r["value"] for r in consume_json(node, "torn")]
    assert values == [f"value-{i}" for i in range(500)]
    assert os.path.getsize(last) == size
    log_text = node.log_text()
    assert "777 bytes" in log_text and "cut" in log_text, log_text[-2000:]


def test_corrupt_byte_in_a_sealed_segment_is_reported_not_skipped(node_processes):
    import meshq

    node = node_processes("n1", extra=["--segment-bytes", "8192"])
    values = [b"%05d-" % i + b"x" * 200 for i in range(300)]
    with meshq.Node(cluster=node.cluster, seeds=[node.seed], mdns=False, role="client") as client:
        for start in range(0, 300, 20):  # small batches, so that segments roll every ~8 KiB
            client.produce_batch("sealed", values[start:start + 20], partition=0, acks="leader").result(10)
    node.kill()
    files = segments(node.data_dir, "sealed", 0)
    assert len(files) >= 3, files
    victim = files[1]
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))
    node.start()
    result = run_cli("consume", "sealed", "--from", "earliest", "--timeout", "3", *connection(node))
    assert result.returncode != 0
    assert "corrupt" in result.stderr.decode().lower() or "crc" in result.stderr.decode().lower()
    printed = result.stdout.decode().splitlines()
    assert len(printed) < 300, "records after the damage must not be served"
    assert printed == [f"{i:05d}-" + "x" * 200 for i in range(len(printed))], "no record skipped before the damage"


def test_second_node_on_the_same_data_dir_refuses_with_a_clear_error(node_processes, tmp_path):
    node = node_processes("n1")
    second = NodeProcess(node.data_dir, cluster=node.cluster, log_path=str(tmp_path / "second.log"))
    with pytest.raises(RuntimeError):
        second.start(timeout_s=15)
    assert "already used by another meshq node" in second.log_text() or "already used" in open(
        second.log_path).read()


def test_status_json_has_the_spec_shape(node_processes):
    node = node_processes("n1")
    run_cli("produce", "shape", "--acks", "leader", *connection(node), input_bytes=b"a\nb\n")
    result = run_cli("status", "--json", *connection(node))
    assert result.returncode == 0, result.stderr.decode()
    status = json.loads(result.stdout)
    assert status["cluster"] == node.cluster
    assert {"node_id", "address", "role", "state"} <= set(status["members"][0])
    topic = next(t for t in status["topics"] if t["name"] == "shape")
    assert {"partition", "leader", "replicas", "in_sync", "high_watermark"} <= set(topic["partitions"][0])
    assert sum(p["high_watermark"] for p in topic["partitions"]) == 2
    assert isinstance(status["groups"], list)


def test_consume_with_group_commits_what_it_printed(node_processes):
    node = node_processes("n1")
    run_cli("produce", "grp", "--acks", "leader", "--partition", "0", *connection(node),
            input_bytes=b"".join(b"%d\n" % i for i in range(20)))
    first = run_cli("consume", "grp", "--group", "g", "--max", "5", "--timeout", "3", *connection(node))
    assert first.stdout.decode().split() == [str(i) for i in range(5)]
    second = run_cli("consume", "grp", "--group", "g", "--timeout", "2", *connection(node))
    assert second.stdout.decode().split() == [str(i) for i in range(5, 20)]


def test_consume_json_uses_base64_for_binary_values(node_processes):
    node = node_processes("n1")
    run_cli("produce", "bin", "--acks", "leader", "--key", "k", *connection(node), input_bytes=b"\xff\xfe\n")
    (record,) = consume_json(node, "bin")
    assert record["key"] == "k" and record["value_b64"] == "//4=" and "value" not in record
    assert set(record) >= {"topic", "partition", "offset", "timestamp_ms", "headers"}


def test_produce_fails_loudly_when_no_node_answers():
    result = run_cli("produce", "t", "--timeout", "1", "--cluster", "x", "--seed", f"127.0.0.1:{free_port()}",
                     "--no-mdns", input_bytes=b"a\n", timeout_s=60)
    assert result.returncode != 0
    assert "storage node" in result.stderr.decode() or "seed" in result.stderr.decode()


def test_bad_flags_are_rejected_with_usage_errors():
    result = run_cli("produce", "t", "--acks", "several")
    assert result.returncode == 2 and b"invalid choice" in result.stderr
    result = run_cli("consume", "t", "--seed", "nohostport")
    assert result.returncode == 2 and b"HOST:PORT" in result.stderr
    result = run_cli("produce", "t", "--no-mdns", input_bytes=b"x\n")
    assert result.returncode == 2 and b"--seed" in result.stderr
