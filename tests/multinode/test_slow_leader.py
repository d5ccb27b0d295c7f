"""A leader slow but alive hands its partitions over, on real `meshq node` processes on 127.0.0.1 (issue #19
item 10; docs/guarantees.md, "A slow leader hands over"). The slowness is a starved CPU — the node stopped for
250 ms and run for 50 ms, over and over (SIGSTOP/SIGCONT on its PID) — which keeps it inside every timeout: without
the rule it would keep leading, and every write to its partitions would wait for it. What it sends on waking is
answered while it runs, so its followers' round trips to it look fast (1-3 ms): the lag of its timers, which its
probes report, is what gives it away (by round trips alone the hand-off took 3.6 to 57 s here, and failed CI's
30 s once; with the lag, ~2 s)."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.multinode.helpers import describe_partitions, node_id, partitions_of, view, wait_agreement, wait_until
from tests.procs import run_cli

TOPIC = "slowlead"
STOPPED_S, RUNNING_S = 0.25, 0.05


def led_by(nodes, who: str, among) -> set[int]:
    """Partitions of TOPIC that ``among``'s own views say ``who`` leads (a starved node answers late: not asked)."""
    led: set[int] = set()
    for node in among:
        status = view(node, timeout_s=2.0)
        if status is None:
            continue
        led |= {p for p, d in partitions_of(status, TOPIC).items() if d["leader"] == who}
    return led


@pytest.mark.timeout(180)
def test_a_leader_starved_of_cpu_hands_its_partitions_over_and_gets_them_back_once_it_runs_again(mesh, timings):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=30)
    produced = run_cli("produce", TOPIC, "--acks", "quorum", "--cluster", mesh.cluster, "--seed", first.seed,
                       "--no-mdns", input_bytes=b"".join(b"%d\n" % i for i in range(40)), timeout_s=60)
    assert produced.returncode == 0, produced.stderr.decode()
    def preferred_of(who: str) -> set[int]:
        """Partitions whose preferred replica (the first of its replicas) is ``who``."""
        status = view(first, timeout_s=2.0) or {}
        return {p for p, d in partitions_of(status, TOPIC).items() if d["replicas"] and d["replicas"][0] == who}

    # settled: every node leads exactly the partitions it is the preferred replica of
    wait_until(lambda: all(preferred_of(node_id(n)) and led_by(nodes, node_id(n), nodes) == preferred_of(node_id(n))
                           for n in nodes), 60, "every partition led by its preferred replica",
               detail=lambda: describe_partitions(nodes, TOPIC))
    victim = max(nodes, key=lambda n: len(preferred_of(node_id(n))))
    victim_id, others = node_id(victim), [n for n in nodes if n is not victim]
    preferred = preferred_of(victim_id)
    stop = threading.Event()

    def describe(among) -> str:
        """The partitions as ``among`` see them, with each one's round trips to its peers (``peer_rtt``)."""
        rtts = {node_id(n): (view(n, timeout_s=2.0) or {}).get("peer_rtt") for n in among}
        return f"{describe_partitions(among, TOPIC)}\npeer_rtt: {rtts}"

    def starve() -> None:
        while not stop.is_set():
            victim.process.send_signal(signal.SIGSTOP)
            stop.wait(STOPPED_S)
            victim.process.send_signal(signal.SIGCONT)
            stop.wait(RUNNING_S)

    starver = threading.Thread(target=starve, name="starve", daemon=True)
    starver.start()
    try:
        started = time.monotonic()
        wait_until(lambda: not led_by(nodes, victim_id, others), 30,
                   f"the starved node {victim_id} leading none of its partitions {sorted(preferred)}",
                   detail=lambda: describe(others))
        timings("slow leader: starved -> none of its partitions led", time.monotonic() - started)
        # no hand-back while it stays slow: 5 s more (a preferred-leader hand-off would come within 2 s)
        with pytest.raises(AssertionError):
            wait_until(lambda: led_by(nodes, victim_id, others), 5, "a hand-back")
        rtts = [view(n)["peer_rtt"].get(victim_id) for n in others]
        assert all(r is not None and r["slow"] for r in rtts), rtts
    finally:
        stop.set()
        starver.join(10)
        victim.process.send_signal(signal.SIGCONT)
    wait_until(lambda: led_by(nodes, victim_id, nodes) == preferred, 40,
               f"{victim_id} leading its preferred partitions {sorted(preferred)} again once it runs",
               detail=lambda: describe_partitions(nodes, TOPIC))
