"""Consumer groups across processes (issue #14 item 1): 3 `meshq node` processes, a 6-partition
topic, 3 consumer processes in one group. They split the partitions (2 each, disjoint); after
kill -9 of one consumer its partitions move to the others within the session timeout (the
failure timeout + 1 s) plus a margin for a loaded machine; every record produced is consumed
at least once."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import meshq
from meshq.config import NodeConfig
from meshq.core.partitions.coordinator import SESSION_MARGIN_S
from tests.multinode.helpers import TIMINGS, wait_agreement, wait_until
from tests.procs import MESHQ, TIME_SCALE, child_env, end_process

TOPIC = "jobs"
GROUP = "workers"
PARTITIONS = 6
SESSION_S = NodeConfig(role="client").failure_timeout_s + SESSION_MARGIN_S
MOVE_BOUND_S = SESSION_S + 15.0 * TIME_SCALE  # the session, then a rebalance on a loaded 2-core machine


class Worker:
    """One consumer process; its JSON lines are read by a thread."""

    def __init__(self, cluster: str, seed: str, log_path: str) -> None:
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [MESHQ[0], "-m", "tests.multinode.group_worker", "--cluster", cluster, "--seed", seed,
             "--topic", TOPIC, "--group", GROUP],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=child_env())
        self.member: str | None = None
        self.assignment: list[int] = []
        self.records: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            with self.lock:
                if "ready" in event:
                    self.member = event["ready"]
                if "assignment" in event:
                    self.assignment = event["assignment"]
                if "records" in event:
                    self.records.extend(tuple(r) for r in event["records"])

    def held(self) -> list[int]:
        with self.lock:
            return list(self.assignment)

    def kill(self) -> None:
        end_process(self.process, graceful=False)
        self._log.close()


def split(workers: list[Worker], expected_sizes: list[int]) -> bool:
    held = [w.held() for w in workers]
    flat = sorted(p for ps in held for p in ps)
    return flat == list(range(PARTITIONS)) and sorted(len(ps) for ps in held) == expected_sizes


def test_three_consumer_processes_split_the_partitions_and_take_over_from_one_killed(mesh):
    first = mesh.start(1)[0]
    nodes = [first, *mesh.start(2, seeds=[first])]
    wait_agreement(nodes, timeout_s=30)
    workers: list[Worker] = []
    with meshq.Node(cluster=mesh.cluster, role="client", seeds=[first.seed], mdns=False) as producer:
        try:
            producer.wait_ready(timeout=30)
            producer.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3)
            produced = [f"v{i}" for i in range(600)]
            for value in produced[:300]:
                producer.produce(TOPIC, value.encode(), key=value.encode(), acks="quorum")
            workers = [Worker(mesh.cluster, nodes[i].seed, f"{mesh.root}/worker{i}.log") for i in range(3)]
            wait_until(lambda: split(workers, [2, 2, 2]), 60 * TIME_SCALE, "3 members holding 2 partitions each",
                       detail=lambda: str([w.held() for w in workers]))
            status = producer.status()
            group = next(g for g in status["groups"] if g["group"] == GROUP)
            assert group["mode"] == "stream" and group["state"] == "stable"
            assert sorted(m["member"] for m in group["members"]) == sorted(w.member for w in workers)

            victim = workers[0]
            lost = victim.held()
            victim.kill()
            killed_s = time.monotonic()
            survivors = workers[1:]
            wait_until(lambda: split(survivors, [3, 3]), MOVE_BOUND_S,
                       f"the partitions {lost} of the killed consumer to move to the others",
                       detail=lambda: str([w.held() for w in survivors]))
            TIMINGS.append(("test_groups", "partitions of a killed consumer moved (s)", time.monotonic() - killed_s))

            for value in produced[300:]:
                producer.produce(TOPIC, value.encode(), key=value.encode(), acks="quorum")

            def consumed() -> set[str]:
                out: set[str] = set()
                for w in workers:
                    with w.lock:
                        out.update(value for _p, _o, value in w.records)
                return out

            wait_until(lambda: consumed() >= set(produced), 60 * TIME_SCALE, "every produced record consumed",
                       detail=lambda: f"{len(set(produced) - consumed())} missing")
            # at-least-once, and each partition read in order by whoever held it
            for w in workers:
                with w.lock:
                    by_partition: dict[int, list[int]] = {}
                    for p, o, _v in w.records:
                        by_partition.setdefault(p, []).append(o)
                for offsets in by_partition.values():
                    assert offsets == sorted(offsets)
        finally:
            for w in workers:
                w.kill()
