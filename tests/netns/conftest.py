"""Fixtures for the network-namespace tests (see ``tests.netns.lab`` for the layout)."""

from __future__ import annotations

import pytest

from tests.multinode.helpers import TIMINGS
from tests.netns.lab import Lab


@pytest.fixture
def lab(request):
    """A built ``Lab``; torn down after the test even when it fails (teardown problems are errors)."""
    the_lab = Lab()
    try:
        try:
            the_lab.build()
        except RuntimeError as exc:
            if not the_lab.created:  # could not even create a namespace: no permission here
                pytest.skip(f"network-namespace tests need root and iproute2 (ip netns): {exc}")
            raise
        yield the_lab
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for node in the_lab.nodes:
                print(f"----- log of the node in {node.host.netns} -----")
                print(node.log_text()[-4000:])
        the_lab.teardown()


@pytest.fixture
def timings(request, record_property):
    def record(label: str, seconds: float) -> None:
        TIMINGS.append((request.node.nodeid, label, seconds))
        record_property(label, round(seconds, 3))
        print(f"{label}: {seconds:.2f} s")

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter):
    mine = [t for t in TIMINGS if t[0].startswith("tests/netns/")]
    if not mine:
        return
    terminalreporter.section("meshq netns: measured timings")
    for test, label, seconds in mine:
        terminalreporter.write_line(f"{seconds:7.2f} s  {label}  ({test})")
