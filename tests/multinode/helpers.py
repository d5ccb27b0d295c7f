"""Helpers for multi-process tests: start `meshq node` processes, read each node's own view, wait for agreement."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from tests.multinode.probe import try_node_status
from tests.procs import NodeProcess

# (test node id, label, seconds): measurements printed in the terminal summary by the conftests
TIMINGS: list[tuple[str, str, float]] = []


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Mesh:
    """The `meshq node` processes of one test, all in cluster ``self.cluster`` unless told otherwise."""

    def __init__(self, root: str, cluster: str) -> None:
        self.root = root
        self.cluster = cluster
        self.nodes: list[NodeProcess] = []
        self._lock = threading.Lock()
        self._count = 0

    def new(self, *, cluster: str | None = None, mdns: bool = False, seeds: Iterable[NodeProcess | str] = (),
            extra: list[str] | None = None) -> NodeProcess:
        """A node process object (not started) with a fresh data directory."""
        with self._lock:
            self._count += 1
            name = f"n{self._count}"
        seed_args: list[str] = []
        for seed in seeds:
            seed_args += ["--seed", seed.seed if isinstance(seed, NodeProcess) else seed]
        node = NodeProcess(f"{self.root}/{name}", cluster=cluster or self.cluster, extra=[*seed_args, *(extra or [])],
                           log_path=f"{self.root}/{name}.log",
                           mdns_interface="127.0.0.1" if mdns else None)  # mDNS always pinned to loopback
        with self._lock:
            self.nodes.append(node)
        return node

    def start(self, count: int = 1, **kwargs: Any) -> list[NodeProcess]:
        """Start ``count`` nodes at the same time (each in its own thread); returns them once all are ready."""
        nodes = [self.new(**kwargs) for _ in range(count)]
        start_all(nodes)
        return nodes

    def kill_all(self) -> None:
        for node in self.nodes:
            try:
                node.kill()
            except Exception:  # keep going: every other node must still be killed
                pass


def start_all(nodes: list[NodeProcess]) -> None:
    """Start (or restart) every node concurrently; raise the first start failure."""
    errors: list[BaseException] = []

    def run(node: NodeProcess) -> None:
        try:
            node.start()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(node,), name=f"start-{node.port}") for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]


def node_id(node: NodeProcess) -> str:
    return node.ready["node_id"]


def view(node: NodeProcess, timeout_s: float = 2.0) -> dict | None:
    """This node's own status (not merged with anyone's), or None if it does not answer."""
    return try_node_status(node.seed, node.cluster, timeout_s)


def member_states(status: dict) -> dict[str, str]:
    return {m["node_id"]: m["state"] for m in status["members"]}


def agreement(nodes: list[NodeProcess], expected_ids: set[str] | None = None) -> dict[str, dict] | None:
    """Every node's view if all of them agree on the membership, else None.

    Agreement: each node's metadata has exactly ``expected_ids`` as voters and the same
    (non-null) leader, its ring is over the same members, and it sees every other
    expected node as alive.
    """
    expected = expected_ids if expected_ids is not None else {node_id(n) for n in nodes}
    views: dict[str, dict] = {}
    for node in nodes:
        status = view(node)
        if status is None or "metadata" not in status:
            return None
        meta = status["metadata"]
        if set(meta["voters"]) != expected or meta["leader"] is None:
            return None
        if set(status.get("ring", {}).get("members", [])) != expected:
            return None
        states = member_states(status)
        if any(states.get(other) != "alive" for other in expected):
            return None
        views[status["node_id"]] = status
    leaders = {v["metadata"]["leader"] for v in views.values()}
    return views if len(leaders) == 1 else None


def describe(nodes: list[NodeProcess]) -> str:
    """A compact dump of every node's view, for assertion messages."""
    lines = []
    for node in nodes:
        status = view(node)
        if status is None:
            lines.append(f"{node.seed}: no answer")
            continue
        meta = status.get("metadata", {})
        lines.append(f"{status['node_id']} @ {node.seed}: voters={meta.get('voters')} leader={meta.get('leader')} "
                     f"term={meta.get('term')} members={member_states(status)}")
    return "\n".join(lines)


def wait_agreement(nodes: list[NodeProcess], timeout_s: float, expected_ids: set[str] | None = None) -> dict:
    try:
        return wait_until(lambda: agreement(nodes, expected_ids), timeout_s, "one agreed membership", 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(nodes)}") from None
