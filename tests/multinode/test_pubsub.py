"""Pub/sub with subscriber processes that are paused (SIGSTOP) or killed: the publisher and the
other subscribers go on, and the drops are counted where they happen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid

import pytest

import meshq
from tests.multinode.helpers import wait_until
from tests.procs import TIME_SCALE, child_env, end_process

pytestmark = pytest.mark.timeout(300)


class SubProcess:
    """A `meshq sub` process whose printed lines are counted by a reader thread."""

    def __init__(self, pattern: str, cluster: str, seed: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshq", "sub", pattern, "--cluster", cluster, "--seed", seed, "--no-mdns"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
        assert self.process.stderr is not None
        first = self.process.stderr.readline().decode()  # "meshq sub: node ID subscribed to ..."
        assert " subscribed to " in first, first
        self.node_id = first.split()[3]
        self.process.stderr.close()  # (nothing else is written there unless it fails)
        self.lines = 0
        self.last = b""
        self.seen_markers: set[bytes] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines += 1
            self.last = line
            if line.startswith(b"marker"):
                self.seen_markers.add(line.strip())

    def end(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        end_process(self.process, close_stdout=False)
        self._reader.join(10)


@pytest.fixture
def publisher():
    with tempfile.TemporaryDirectory(prefix="meshq-ps-") as root:
        node = meshq.Node(cluster=f"ps-{uuid.uuid4().hex[:8]}", data_dir=os.path.join(root, "data"), mdns=False,
                          replication_factor=1)
        with node:
            yield node


def subscribers_known(node: meshq.Node, subject: str, count: int) -> bool:
    return len(node.core.pubsub.route(subject).remote) >= count


def until_seen(node: meshq.Node, sub: SubProcess, within_s: float) -> None:
    """Publish numbered markers until ``sub`` prints one: it is receiving what is published now."""
    counter = iter(range(1_000_000))

    def seen() -> bool:
        node.publish("load", b"marker-%d" % next(counter))
        return bool(sub.seen_markers)
    wait_until(seen, within_s, "a marker to reach the subscriber", interval_s=0.05)


def node_report(node: meshq.Node, node_id: str) -> dict | None:
    for report in node.status()["pubsub"]["nodes"]:
        if report["node_id"] == node_id:
            return report
    return None


def test_a_paused_subscriber_stalls_nobody_and_its_node_counts_what_it_missed(publisher):
    seed = publisher.address.removeprefix("tcp://")
    paused = SubProcess("load", publisher.config.cluster, seed)
    healthy = SubProcess("load", publisher.config.cluster, seed)
    try:
        wait_until(lambda: subscribers_known(publisher, "load", 2), 30 * TIME_SCALE, "both subscribers' interest")
        os.kill(paused.process.pid, signal.SIGSTOP)
        data = b"x" * 1000
        for _ in range(150_000):  # far more than the paused node's socket buffers and queues hold
            publisher.publish("load", data)
        # (it returned: the publisher never waited for the paused subscriber)
        until_seen(publisher, healthy, 60 * TIME_SCALE)
        assert healthy.lines > 1000
        os.kill(paused.process.pid, signal.SIGCONT)
        healthy.seen_markers.clear()
        until_seen(publisher, paused, 60 * TIME_SCALE)  # it receives again once it runs

        def dropped_counted() -> bool:
            report = node_report(publisher, paused.node_id)
            return report is not None and (
                any(p["node_id"] == publisher.node_id and p["dropped"] > 0 for p in report["peers"])
                or any(s["dropped"] > 0 for s in report["subscriptions"]))
        wait_until(dropped_counted, 30 * TIME_SCALE, "the paused node to report drops")
    finally:
        paused.end()
        healthy.end()


def test_a_killed_subscriber_stalls_nobody_and_leaves_the_routes(publisher):
    seed = publisher.address.removeprefix("tcp://")
    doomed = SubProcess("load", publisher.config.cluster, seed)
    healthy = SubProcess("load", publisher.config.cluster, seed)
    try:
        wait_until(lambda: subscribers_known(publisher, "load", 2), 30 * TIME_SCALE, "both subscribers' interest")
        assert doomed.node_id in publisher.core.pubsub.route("load").remote
        os.kill(doomed.process.pid, signal.SIGKILL)
        for _ in range(50_000):
            publisher.publish("load", b"y" * 100)
        until_seen(publisher, healthy, 60 * TIME_SCALE)
        wait_until(lambda: len(publisher.core.pubsub.route("load").remote) == 1,
                   (publisher.config.failure_timeout_s + 10) * TIME_SCALE, "the killed node's interest to go")
        assert publisher.core.pubsub.route("load").remote == (healthy.node_id,)
    finally:
        doomed.end()
        healthy.end()
