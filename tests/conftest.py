"""Shared fixtures: process cleanup by PID and a thread-leak check for in-process nodes."""

from __future__ import annotations

import threading

import pytest

from tests.procs import NodeProcess


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


@pytest.fixture
def no_thread_leak():
    """Fail the test if it leaves meshq runtime threads behind."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t.name for t in threading.enumerate()
              if t.ident not in before and t.name.startswith("meshq-") and t.is_alive()]
    for thread in threading.enumerate():
        if thread.name in leaked:
            thread.join(2.0)
    leaked = [name for name in leaked if any(t.name == name and t.is_alive() for t in threading.enumerate())]
    assert not leaked, f"runtime threads left running: {leaked}"
