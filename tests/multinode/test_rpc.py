"""Request/reply across processes: a serving process killed with -9 in the middle of a stream."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

import meshq
from tests.multinode.helpers import wait_until
from tests.procs import START_DEADLINE_S, child_env, end_process, read_ready_line

pytestmark = pytest.mark.timeout(240)


class Server:
    """One ``tests.multinode.rpc_server`` process; killed by PID."""

    def __init__(self, cluster: str, seed: str, log_path: str) -> None:
        self.log_path = log_path
        self.process = subprocess.Popen([sys.executable, "-m", "tests.multinode.rpc_server", cluster, seed, log_path],
                                        stdout=subprocess.PIPE, stderr=open(log_path + ".err", "ab"),
                                        stdin=subprocess.DEVNULL, env=child_env())
        line, problem = read_ready_line(self.process, START_DEADLINE_S)
        if not line.startswith(b"{"):
            self.kill()
            raise RuntimeError(f"server did not start: {problem}")
        self.node_id = json.loads(line)["node_id"]

    def kill(self) -> None:
        end_process(self.process, graceful=False)

    def runs(self) -> list[tuple[str, str]]:
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, "rb") as f:
            return [tuple(line.decode().split(" ", 1)) for line in f.read().splitlines()]


def test_kill_9_of_a_serving_process_mid_stream(mesh):
    (storage,) = mesh.start(1)
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            servers.append(Server(mesh.cluster, storage.seed, os.path.join(mesh.root, f"runs-{name}.log")))
        with meshq.Node(cluster=mesh.cluster, seeds=[storage.seed], mdns=False, role="client") as caller:
            expected = sorted(s.node_id for s in servers)
            wait_until(lambda: all(caller.status()["service_instances"].get(name) == expected
                                   for name in ("idem", "once")), 30, "both instances offering both services")
            outcomes: dict[tuple[str, str], object] = {}

            def stream(service: str, count: int) -> None:
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    futures = {pool.submit(caller.request, service, f"{i}", 20.0): f"{i}" for i in range(count)}
                    for future, payload in futures.items():
                        try:
                            outcomes[(service, payload)] = future.result()
                        except meshq.MeshqError as exc:
                            outcomes[(service, payload)] = exc

            with concurrent.futures.ThreadPoolExecutor(2) as streams:
                running = [streams.submit(stream, "idem", 400), streams.submit(stream, "once", 400)]
                wait_until(lambda: len(servers[0].runs()) >= 100, 60, "the first 100 runs on the victim")
                servers[0].kill()  # kill -9 in the middle of both streams
                for future in running:
                    future.result()
            idem = {p: o for (s, p), o in outcomes.items() if s == "idem"}
            assert all(o == p.encode() for p, o in idem.items()), \
                [(p, o) for p, o in idem.items() if o != p.encode()][:3]
            once = {p: o for (s, p), o in outcomes.items() if s == "once"}
            failed = {p: o for p, o in once.items() if not isinstance(o, bytes)}
            assert all(isinstance(o, meshq.OutcomeUnknownError) for o in failed.values()), list(failed.values())[:3]
            assert all(o == p.encode() for p, o in once.items() if p not in failed)
            runs = Counter(run for server in servers for run in server.runs())
            twice = [run for run, n in runs.items() if run[0] == "once" and n > 1]
            assert twice == [], f"non-idempotent requests ran twice: {twice[:5]}"
            for payload in once:
                if payload not in failed:
                    assert runs[("once", payload)] == 1
            assert servers[1].runs(), "the surviving instance took requests"
    finally:
        for server in servers:
            server.kill()
