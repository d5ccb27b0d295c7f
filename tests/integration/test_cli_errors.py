"""CLI errors found by trying meshq as a new user would (issue #16, "bad input and rough edges"): each names the real
culprit and the flag to change, in one line, with no traceback."""

from __future__ import annotations

import socket

import pytest

from tests.procs import run_cli

pytestmark = pytest.mark.timeout(120)


def error_line(result) -> str:
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("meshq ")]
    assert "Traceback" not in result.stderr.decode(), result.stderr.decode()
    assert len(lines) == 1, result.stderr.decode()
    return lines[0]


def test_a_busy_pub_port_is_reported_as_the_pub_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("node", "--data", str(tmp_path / "n"), "--port", "0", "--pub-port", str(port), "--no-mdns",
                         timeout_s=60)
    assert result.returncode == 1
    line = error_line(result)
    assert "--pub-port" in line and "PUB" in line and f":{port}" in line, line
    assert "choose a free --port " not in line, line


def test_a_busy_port_is_reported_as_the_router_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("node", "--data", str(tmp_path / "n"), "--port", str(port), "--no-mdns", timeout_s=60)
    assert result.returncode == 1
    line = error_line(result)
    assert "--port" in line and "ROUTER" in line and "--pub-port" not in line, line


def test_an_empty_group_name_is_called_a_group_name():
    result = run_cli("consume", "t", "--group", "", "--seed", "127.0.0.1:1", "--no-mdns", timeout_s=30)
    assert result.returncode == 2
    message = result.stderr.decode().strip().splitlines()[-1]
    assert "--group" in message and "consumer group name ''" in message and "topic" not in message, message


def test_data_that_is_a_file_is_called_a_file_not_a_lock_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for data in (afile, afile / "below"):
        result = run_cli("node", "--data", str(data), "--port", "0", "--no-mdns", timeout_s=60)
        assert result.returncode == 2
        line = error_line(result)
        assert f"--data {data}" in line and "is a file" in line and "lock" not in line, line
