"""Shared fixtures: process cleanup by PID and a thread-leak check for in-process nodes."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

# Every message a meshq node sends in the tests is checked against its schema (meshq.core.wire),
# here and in the node processes the tests start (they inherit the environment).
os.environ["MESHQ_CHECK_OUTGOING"] = "1"

import pytest  # noqa: E402

from meshq.core import wire  # noqa: E402
from tests.multinode.helpers import TIMINGS  # noqa: E402
from tests.procs import TIME_SCALE, NodeProcess  # noqa: E402

wire.CHECK_OUTGOING = True  # in case meshq was imported before this file


@pytest.fixture
def node_processes(tmp_path):
    """Factory for `meshq node` processes; every one is killed (by PID) at teardown."""
    started: list[NodeProcess] = []

    def start(name: str = "n1", **kwargs) -> NodeProcess:
        node = NodeProcess(str(tmp_path / name), **kwargs)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.kill()


@pytest.fixture(autouse=True)
def no_thread_leak():
    """Fail any test that leaves meshq runtime threads behind (on for every test)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate()
              if t.ident not in before and t.name.startswith("meshq-") and t.is_alive()]
    # a stopped node's thread may still be finishing on a loaded machine: wait for it to end (one shared deadline)
    grace_s = 10.0 * TIME_SCALE
    deadline = time.monotonic() + grace_s
    for thread in leaked:
        thread.join(max(0.0, deadline - time.monotonic()))
    still = [t for t in leaked if t.is_alive()]
    frames = sys._current_frames()
    stacks = "\n".join(f"--- {t.name} ---\n{''.join(traceback.format_stack(frames[t.ident]))}"
                       for t in still if t.ident in frames)
    assert not still, f"runtime threads still running {grace_s:.0f} s after the test: {[t.name for t in still]}\n{stacks}"


@pytest.fixture
def timings(request, record_property):
    """``timings(label, seconds)`` records a measurement (shown in the terminal summary)."""

    def record(label: str, seconds: float) -> None:
        TIMINGS.append((request.node.nodeid, label, seconds))
        record_property(label, round(seconds, 3))
        print(f"{label}: {seconds:.2f} s")

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (fixtures print node logs when a test failed)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter):
    for suite in ("multinode", "netns"):
        mine = [t for t in TIMINGS if t[0].startswith(f"tests/{suite}/")]
        if mine:
            terminalreporter.section(f"meshq {suite}: measured timings")
            for test, label, seconds in mine:
                terminalreporter.write_line(f"{seconds:7.2f} s  {label}  ({test})")
