"""`meshq serve` and `meshq request` as a user runs them: real processes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.procs import MESHQ, START_DEADLINE_S, child_env, end_process, read_ready_line, run_cli

pytestmark = pytest.mark.timeout(180)


def connection(node) -> list[str]:
    return ["--cluster", node.cluster, "--seed", node.seed, "--no-mdns"]


@pytest.fixture
def servers():
    started: list[subprocess.Popen] = []

    def start(*args: str) -> dict:
        process = subprocess.Popen([*MESHQ, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, env=child_env())
        started.append(process)
        line, problem = read_ready_line(process, START_DEADLINE_S)
        assert line.startswith(b"{"), problem
        return json.loads(line)

    yield start
    for process in started:
        end_process(process)  # SIGTERM: a clean stop


def test_serve_exec_echo_and_request_errors(node_processes, servers):
    node = node_processes("n1")
    ready = servers("upper", "--exec", "tr a-z A-Z", "--concurrency", "2", *connection(node))
    assert ready["service"] == "upper"
    servers("echo", *connection(node))
    servers("fails", "--exec", "echo broken >&2; exit 3", *connection(node))
    result = run_cli("request", "upper", *connection(node), input_bytes=b"hello\nworld\n")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"HELLO\nWORLD\n"
    result = run_cli("request", "echo", *connection(node), input_bytes=b"same\n")
    assert (result.returncode, result.stdout) == (0, b"same\n")
    result = run_cli("request", "fails", *connection(node), input_bytes=b"x\n")
    assert result.returncode == 1
    assert b"RemoteError" in result.stderr and b"status 3" in result.stderr and b"broken" in result.stderr
    result = run_cli("request", "nobody.here", *connection(node), input_bytes=b"x\n")
    assert result.returncode == 1 and b"NoRespondersError" in result.stderr and b"nobody.here" in result.stderr
    result = run_cli("request", "bad..name", *connection(node), input_bytes=b"x\n")
    assert result.returncode != 0 and b"empty token" in result.stderr
