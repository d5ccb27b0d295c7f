"""Fixtures for multi-process tests: several `meshq node` processes on 127.0.0.1.

Every test gets its own cluster name (so concurrent runs on the same host, which share
mDNS on 127.0.0.1, never see each other), its own temporary directory (removed at
teardown, pass or fail), and a ``Mesh`` that starts nodes and kills every one of them by
PID at teardown. When a test fails, the tail of each node's log is printed.

Timings measured by the tests (convergence, failure detection) are collected with the
``timings`` fixture and printed in the terminal summary, so ``pytest -q`` shows them.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid

import pytest

from tests.multinode.helpers import Mesh


@pytest.fixture
def mesh(request):
    """A ``Mesh`` whose processes are killed (by PID) and whose directory is removed at teardown."""
    root = tempfile.mkdtemp(prefix="meshq-multinode-")
    cluster = f"mn-{uuid.uuid4().hex[:10]}"
    m = Mesh(root, cluster)
    try:
        yield m
    finally:
        m.kill_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for node in m.nodes:
                print(f"----- log of {node.ready.get('node_id', '?')} ({node.log_path}) -----")
                print(node.log_text()[-4000:])
        shutil.rmtree(root, ignore_errors=True)
