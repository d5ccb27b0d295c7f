"""``--log-format json``: one JSON object per line (ts, level, logger, message, extra fields) for
`meshq node` and every other command; text stays the default."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import pytest

from meshq.cli import build_parser
from meshq.cli.logs import JsonFormatter
from tests.procs import NodeProcess, free_port, run_cli

pytestmark = pytest.mark.timeout(120)


def test_json_formatter_writes_the_standard_and_the_extra_fields():
    record = logging.LogRecord("meshq.test", logging.WARNING, __file__, 1, "lag %d on %s", (42, "orders/1"), None)
    record.__dict__.update({"node_id": "vm-1", "partition": 1, "odd": object()})
    line = JsonFormatter().format(record)
    out = json.loads(line)
    assert out["level"] == "WARNING" and out["logger"] == "meshq.test" and out["message"] == "lag 42 on orders/1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out["ts"]), out["ts"]
    assert out["node_id"] == "vm-1" and out["partition"] == 1 and out["odd"].startswith("<object")
    assert "\n" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("meshq.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(failed))["exception"]


def test_every_command_takes_log_format_and_text_is_the_default():
    parser = build_parser()
    for argv in (["node", "--data", "d"], ["produce", "t"], ["consume", "t"], ["status"], ["leave"],
                 ["topics", "list"], ["bench", "produce"], ["demo"], ["pub", "a.b"], ["sub", "a.b"],
                 ["request", "svc"], ["serve", "svc"]):
        assert parser.parse_args(argv).log_format == "text", argv
        assert parser.parse_args([*argv, "--log-format", "json"]).log_format == "json", argv
    result = run_cli("status", "--log-format", "yaml")
    assert result.returncode == 2 and b"invalid choice" in result.stderr


def test_bad_log_format_in_the_environment_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("MESHQ_LOG_FORMAT", "bogus")
    result = run_cli("status", "--no-mdns", "--seed", "127.0.0.1:1")
    assert result.returncode == 2 and b"MESHQ_LOG_FORMAT" in result.stderr and b"Traceback" not in result.stderr


def test_node_logs_json_lines_with_its_node_id(tmp_path):
    node = NodeProcess(str(tmp_path / "n1"), extra=["--log-format", "json"])
    node.start()
    try:
        node_id = node.ready["node_id"]
    finally:
        assert node.stop().clean
    lines = [line for line in node.log_text().splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record), record
    stopped = [r for r in records if "stopped in" in r["message"]]
    assert stopped and stopped[0]["node_id"] == node_id and stopped[0]["cluster"] == node.cluster
    assert stopped[0]["stop_s"] >= 0
    assert any(r["logger"].startswith("meshq.") and r["logger"] != "meshq.cli" for r in records)


def test_client_command_logs_and_its_failure_are_json_lines():
    result = run_cli("status", "--log-format", "json", "--log-level", "INFO", "--no-mdns", "--cluster", "nobody",
                     "--seed", f"127.0.0.1:{free_port()}", timeout_s=60)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.decode().splitlines() if line.strip()]
    assert len(records) >= 2 and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    assert records[-1]["level"] == "ERROR" and records[-1]["error"] == "no_responders"
    assert records[-1]["command"] == "status" and "cluster 'nobody'" in records[-1]["message"]
    text = run_cli("status", "--log-level", "INFO", "--no-mdns", "--cluster", "nobody",
                   "--seed", f"127.0.0.1:{free_port()}", timeout_s=60)
    assert text.stderr.decode().splitlines()[-1].startswith("meshq status: no storage node")
    assert not text.stderr.startswith(b"{")


@pytest.fixture(autouse=True)
def _no_env_format(monkeypatch):
    monkeypatch.delenv("MESHQ_LOG_FORMAT", raising=False)
    assert "MESHQ_LOG_FORMAT" not in os.environ
