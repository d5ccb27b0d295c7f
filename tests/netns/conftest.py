"""Fixtures for the network-namespace tests (see ``tests.netns.lab`` for the layout)."""

from __future__ import annotations

import pytest

from tests.netns.lab import Lab


@pytest.fixture
def lab(request):
    """A built ``Lab``; torn down after the test even when it fails (teardown problems are errors). Indirect
    parametrization passes ``Lab`` options: ``@pytest.mark.parametrize("lab", [{"hosts": 4}], indirect=True)``."""
    the_lab = Lab(**getattr(request, "param", {}))
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
            for writer in the_lab.writers:
                print(f"----- log of writer {writer.name} in {writer.host.netns} -----")
                print(writer.log_text()[-2000:])
        the_lab.teardown()
