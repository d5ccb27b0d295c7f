"""`meshq demo` end to end (issue #16 item 2): exit code, the final table and JSON, and no process left behind, also
when it is interrupted or fails."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time

import pytest

from tests.procs import MESHQ, TIME_SCALE, child_env

pytestmark = pytest.mark.timeout(300)


def processes_of(cluster: str) -> list[str]:
    """Command lines of running processes that name ``cluster`` (the demo's nodes take --cluster CLUSTER)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if cluster in cmdline and state != b"Z":
            found.append(f"{pid}: {cmdline}")
    return found


def test_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path):
    result = subprocess.run([*MESHQ, "demo", "--json", "--records", "500"], capture_output=True, env=child_env(),
                            timeout=180 * TIME_SCALE)
    story = result.stderr.decode()
    assert result.returncode == 0, story
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["missing"] == 0
    assert report["acknowledged"] == 1000 == report["read_back"]
    assert sum(row["acknowledged"] for row in report["partitions"]) == 1000
    assert all(row["missing"] == 0 for row in report["partitions"])
    assert len(report["nodes"]) == 3 and report["killed"]["node_id"] in {n["node_id"] for n in report["nodes"]}
    assert report["failover_s"] > 0
    assert report["stopped"][report["killed"]["name"]] == -signal.SIGKILL
    assert sorted(code for name, code in report["stopped"].items() if name != report["killed"]["name"]) == [0, 0]
    # the story: discovery, the kill, the failover and the table
    for text in ("discovery", "SIGKILL", "live leader again", "acknowledged", "read back", "missing"):
        assert text in story, story
    assert processes_of(report["cluster"]) == []
    assert report["data_kept"] is False and not os.path.exists(report["data_dir"])  # its temporary directory


def test_demo_interrupted_stops_every_node_it_started():
    process = subprocess.Popen([*MESHQ, "demo", "--json", "--records", "200000"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=child_env())
    try:
        seen = b""
        deadline = time.monotonic() + 120 * TIME_SCALE
        while b"started node-3" not in seen and time.monotonic() < deadline and process.poll() is None:
            readable, _, _ = select.select([process.stderr], [], [], 0.5)
            if readable:
                seen += os.read(process.stderr.fileno(), 65536)
        assert b"started node-3" in seen, seen.decode()
        cluster = re.search(rb"cluster (demo-[0-9a-f]+)", seen).group(1).decode()
        assert len(processes_of(cluster)) == 3
        os.kill(process.pid, signal.SIGINT)  # Ctrl-C, to the demo alone
        out, err = process.communicate(timeout=60 * TIME_SCALE)
        assert process.returncode == 130, (seen + err).decode()
        assert json.loads(out)["error"] == "interrupted"
        assert processes_of(cluster) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_demo_that_cannot_start_says_why_in_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = subprocess.run([*MESHQ, "demo", "--data", str(not_a_dir)], capture_output=True, env=child_env(),
                            timeout=60 * TIME_SCALE)
    assert result.returncode == 1
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("meshq demo:")]
    assert len(errors) == 1 and "--data" in errors[0] and "Traceback" not in result.stderr.decode(), errors
