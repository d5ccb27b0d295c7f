"""Progress on long CLI actions: a bar on stderr only when it is a terminal (issue #16 item 5)."""

from __future__ import annotations

import io
import os
import pty
import subprocess

import pytest
from rich.console import Console

from meshq.bench.console import _RoundsBar
from meshq.cli.output import TerminalBar, _LeaveProgress
from tests.procs import MESHQ, NodeProcess, child_env

pytestmark = pytest.mark.timeout(120)


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=80), out


def test_bar_counts_and_shows_the_total_on_a_terminal():
    console, out = terminal()
    bar = TerminalBar("produce orders", enabled=True, console=console)
    bar.update(1500)
    bar.close(2500)
    assert "produce orders" in out.getvalue() and "2,500 records" in out.getvalue()
    console, out = terminal()
    bar = TerminalBar("consume orders", total=40, enabled=True, console=console)
    bar.close(40)
    assert "40/40 records" in out.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal():
    bar = TerminalBar("produce orders")  # pytest captures stderr: not a terminal
    assert not bar.enabled and bar.progress is None
    bar.update(10)
    bar.close(10)  # harmless
    rounds = _RoundsBar("bench rpc", 3)
    rounds.advance()
    rounds.close()
    assert not rounds.bar.enabled


def test_leave_progress_on_a_terminal_is_a_bar_of_partitions_moved(capsys):
    console, out = terminal()
    progress = _LeaveProgress(bar=TerminalBar("moving partitions away", unit="partitions", enabled=True,
                                              console=console))
    for assigned in (8, 5, 0):
        progress({"state": "draining", "assigned": assigned})
    progress({"state": "left", "assigned": 0})
    progress.close()
    assert "8/8 partitions" in out.getvalue()
    assert capsys.readouterr().out == ""  # the bar replaces the lines
    lines = _LeaveProgress(bar=TerminalBar("x", enabled=False))
    lines({"state": "draining", "assigned": 3})
    assert capsys.readouterr().out == "draining: 3 partition(s) still assigned\n"
    quiet = _LeaveProgress(quiet=True, bar=TerminalBar("x", enabled=False))
    quiet({"state": "draining", "assigned": 3})
    assert capsys.readouterr().out == ""  # --json: nothing but the outcome object


def run_produce(node: NodeProcess, stderr_is_terminal: bool) -> bytes:
    """`meshq produce` of 3000 lines; what it wrote on stderr (a pty's or a pipe's)."""
    command = [*MESHQ, "produce", "progress", "--acks", "leader", "--cluster", node.cluster, "--seed", node.seed,
               "--no-mdns"]
    lines = b"".join(b"%d\n" % i for i in range(3000))
    if not stderr_is_terminal:
        result = subprocess.run(command, input=lines, capture_output=True, timeout=60, env=child_env())
        assert result.returncode == 0, result.stderr
        return result.stderr
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=follower,
                                   env={**child_env(), "TERM": "xterm", "COLUMNS": "80"})
        os.close(follower)
        follower = -1
        process.communicate(lines, timeout=60)
        assert process.returncode == 0
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        return seen
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)


def test_produce_shows_progress_on_a_terminal_only(tmp_path):
    node = NodeProcess(str(tmp_path / "n1")).start()
    try:
        on_terminal = run_produce(node, stderr_is_terminal=True)
        assert b"produce progress" in on_terminal and b"3,000" in on_terminal, on_terminal[-500:]
        in_pipe = run_produce(node, stderr_is_terminal=False)
        assert in_pipe == b""
    finally:
        node.kill()
