"""The short fault run (issue #19 items 9-10): 5 `meshq node` processes in network namespaces, a quorum producer
and a consumer throughout, every fault kind of ``tests.faults.run`` injected at least once (kill -9, SIGSTOP, a
1 | 4 and two 2 | 3 splits, random loss, a slow link, a data disk under --min-free-bytes and one full to the last
byte) over ~1.5 min at ~200 records/s, then the independent checker: every acknowledged record present exactly
once at its offset, in order, nothing a consumer read rewritten, every replica byte-identical below the high
watermark. Prints the fault table (availability figures beside the safety ones). The 30-minute version:
``tox -e faults`` / ``python -m tests.faults``.

Root only (namespaces, tc, tmpfs mounts); everything is removed afterwards, pass or fail."""

from __future__ import annotations

import random

import pytest

from tests.faults.run import KINDS, run_faults
from tests.netns.lab import can_use_netns

pytestmark = pytest.mark.skipif(not can_use_netns(), reason="the fault run needs root and iproute2 (ip netns, tc) "
                                "for network namespaces, tc filters and tmpfs data disks")


@pytest.mark.timeout(900)
def test_short_fault_run_loses_nothing_acknowledged_and_replicas_agree():
    seed = random.randrange(1 << 30)
    print(f"fault run seed {seed} (python -m tests.faults --minutes 1.5 --rate 200 --seed {seed})")
    report = run_faults(minutes=1.5, nodes=5, seed=seed, rate=200.0, partitions=5, hold_s=(4.0, 8.0),
                        pause_s=(2.0, 4.0), tmpfs_mb=128)
    injected = {f.kind for f in report.faults}
    assert injected == set(KINDS), f"fault kinds never injected: {set(KINDS) - injected}"
    assert report.verdict.acked > 0, "nothing was acknowledged"
    assert not report.problems, f"seed {seed}:\n" + "\n".join(report.problems) + "\n" + report.table
