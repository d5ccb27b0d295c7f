"""``meshq bench queue``: shared-subscription throughput with per-record acks on a replicated cluster.

Theory of operation
-------------------
``--nodes`` (3) ``meshq node`` children on 127.0.0.1, one topic per round (8 partitions,
``--replication-factor`` 3) preloaded with ``--jobs`` records of ``--value-bytes`` (100) at
``acks=quorum``. Per round, first the **baseline measured in the same run**: one stream
consumer (``mode="stream"``, no group) in this process reads the same records once. Then
``--workers`` (3) worker processes (``meshq.bench.queue_worker``), each a client node with a
shared consumer of a fresh group, are told ``go`` together; the clock stops when the
partition leaders report (``status``) that every record is acked (acks confirmed: committed
at a majority). Reported per round and as median / min / max over ``--rounds`` (3): acked
records/s, wall time, CPU seconds of every process involved (nodes and workers, from
/proc, so user + system) per record, and the ratio to the baseline. RabbitMQ (quorum queue)
and Redis streams (``queue_peers.py``) run in the same run, a round of each right after
meshq's round (alternating), with the same records, workers and per-record acks, when
``rabbitmq-server`` / ``redis-server`` and their Python clients are installed; the report
says "not installed: not measured" when they are not, and gives the ratio meshq / peer.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from meshq.bench.console import _progress, _RoundsBar
from meshq.bench.cpu import _CpuSampler
from meshq.bench.errors import BenchError, _error_text
from meshq.bench.procs import PARTITIONS, _Cluster
from meshq.bench.queue_peers import start_peers
from meshq.bench.status import CLUSTER_READY_TIMEOUT_S, _start_with_client, _wait_cluster
from meshq.errors import MeshqError

ACKED_TIMEOUT_S = 600.0


def _acked(client: Any, group: str) -> int:
    try:
        groups = {g["group"]: g for g in client.status(timeout=5)["groups"]}
    except MeshqError:
        return -1
    entry = groups.get(group)
    return sum(p.get("acked", 0) for p in entry["partitions"]) if entry else 0


def _preload(client: Any, topic: str, jobs: int, value_bytes: int, batch: int) -> None:
    value = b"x" * value_bytes
    futures = [client.produce_batch(topic, [value] * min(batch, jobs - start), acks="quorum")
               for start in range(0, jobs, batch)]
    for future in futures:
        future.result(120)


def _baseline(client: Any, topic: str, jobs: int) -> dict[str, Any]:
    sampler = _CpuSampler({"bench": os.getpid()})
    consumer = client.consumer(topic)
    read = 0
    sampler.start()
    t0 = time.perf_counter()
    deadline = time.monotonic() + ACKED_TIMEOUT_S
    while read < jobs and time.monotonic() < deadline:
        read += len(consumer.poll(timeout=0.5, max_records=5000))
    wall = time.perf_counter() - t0
    sampler.stop()
    consumer.close()
    cpu = sum(seconds for _name, seconds in sampler.cpu.values())
    return {"records": read, "wall_s": round(wall, 3), "records_per_s": round(read / wall),
            "cpu_us_per_record": round(1e6 * cpu / max(1, read), 1)}


def _round(client: Any, cluster: _Cluster, args: Any, topic: str, group: str, workdir: str) -> dict[str, Any]:
    workers = []
    try:
        for i in range(args.workers):
            argv = [sys.executable, "-m", "meshq.bench.queue_worker", "--cluster", args.cluster, "--topic", topic,
                    "--group", group, *[a for seed in cluster.seeds for a in ("--seed", seed)]]
            stderr = open(os.path.join(workdir, f"{group}-worker{i + 1}.stderr"), "wb")
            workers.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                            text=True))
            stderr.close()
        for worker in workers:
            line = worker.stdout.readline()
            if '"ready"' not in line:
                raise BenchError(f"a queue worker did not start: {line!r}")
        sampler = _CpuSampler({**cluster.pids(), **{f"worker{i + 1}": w.pid for i, w in enumerate(workers)}})
        sampler.start()
        t0 = time.perf_counter()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        deadline = time.monotonic() + ACKED_TIMEOUT_S
        acked = 0
        while acked < args.jobs:
            if time.monotonic() > deadline:
                raise BenchError(f"only {acked} of {args.jobs} records acked within {ACKED_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
            acked = _acked(client, group)
        wall = time.perf_counter() - t0
        sampler.stop()
        done = []
        for worker in workers:
            worker.stdin.write("stop\n")
            worker.stdin.flush()
        for worker in workers:
            out, _ = worker.communicate(timeout=60)
            done.extend(json.loads(line)["acked"] for line in out.splitlines() if '"done"' in line)
        cpu = sum(seconds for _name, seconds in sampler.cpu.values())
        return {"acked": acked, "per_worker": done, "wall_s": round(wall, 3), "acked_per_s": round(acked / wall),
                "cpu_us_per_record": round(1e6 * cpu / acked, 1), "cpu": sampler.summary()}
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _peer_summary(entry: dict[str, Any], meshq_rounds: list[dict[str, Any]]) -> None:
    rounds = entry["rounds"]
    if not rounds:
        return
    for r, ours in zip(rounds, meshq_rounds):
        r["meshq_ratio"] = round(ours["shared"]["acked_per_s"] / r["acked_per_s"], 3)
    entry["summary"] = {
        "acked_per_s": _spread([r["acked_per_s"] for r in rounds]),
        "cpu_us_per_record": _spread([r["cpu_us_per_record"] for r in rounds]),
        "meshq_ratio": _spread([r["meshq_ratio"] for r in rounds]),
    }


def run_queue(args: Any, workdir: str) -> dict[str, Any]:
    replication_factor = min(args.replication_factor, args.nodes)
    cluster = _Cluster(args.nodes, workdir, args, replication_factor)
    out: dict[str, Any] = {"nodes": args.nodes, "replication_factor": replication_factor, "partitions": PARTITIONS,
                           "workers": args.workers, "jobs": args.jobs, "rounds": []}
    client = None
    peers: dict[str, Any] = {}
    rounds_bar = None
    try:
        client = _start_with_client(args, cluster, out)
        _progress("starting the peers (RabbitMQ, Redis) that are installed")
        peers, out["peers"] = start_peers(workdir)
        run_id = uuid.uuid4().hex[:8]
        rounds_bar = _RoundsBar("bench queue", args.rounds)
        for number in range(args.rounds):
            if number:
                rounds_bar.advance()
            topic = f"queue-{run_id}-{number}"
            client.create_topic(topic, partitions=PARTITIONS, replication_factor=replication_factor,
                                retention_ms=None)
            status, problem = _wait_cluster(client, topic, cluster, CLUSTER_READY_TIMEOUT_S, need_in_sync=True)
            if status is None:
                raise BenchError(f"the cluster did not get ready for {topic}: {problem}")
            _progress(f"round {number + 1}: preloading {args.jobs} records")
            _preload(client, topic, args.jobs, args.value_bytes, args.batch)
            _progress(f"round {number + 1}: baseline (one stream consumer)")
            baseline = _baseline(client, topic, args.jobs)
            _progress(f"round {number + 1}: {args.workers} shared workers, per-record acks")
            shared = _round(client, cluster, args, topic, f"workers-{run_id}-{number}", workdir)
            shared["ratio_to_baseline"] = round(shared["acked_per_s"] / baseline["records_per_s"], 3)
            out["rounds"].append({"baseline": baseline, "shared": shared})
            for name, peer in list(peers.items()):
                _progress(f"round {number + 1}: {name}, {args.workers} workers, per-record acks")
                try:
                    out["peers"][name]["rounds"].append(peer.round(args, number))
                except Exception as exc:  # a peer's failure is reported, it does not stop meshq's figures
                    out["peers"][name]["error"] = f"{type(exc).__name__}: {exc}"
                    peer.stop()
                    del peers[name]
        rounds_bar.advance()
        rounds = out["rounds"]
        out["summary"] = {
            "acked_per_s": _spread([r["shared"]["acked_per_s"] for r in rounds]),
            "shared_cpu_us_per_record": _spread([r["shared"]["cpu_us_per_record"] for r in rounds]),
            "baseline_records_per_s": _spread([r["baseline"]["records_per_s"] for r in rounds]),
            "ratio_to_baseline": _spread([r["shared"]["ratio_to_baseline"] for r in rounds]),
        }
        for entry in out["peers"].values():
            if isinstance(entry, dict):
                _peer_summary(entry, rounds)
        return out
    except (BenchError, MeshqError) as exc:
        out["error"] = _error_text(exc)
        return out
    finally:
        if rounds_bar is not None:
            rounds_bar.close()
        out["node_pids"] = cluster.launched_pids
        for peer in peers.values():
            peer.stop()
        out.setdefault("peers", {})
        try:
            if client is not None:
                client.stop()
        finally:
            cluster.stop()


def render_queue(report: dict[str, Any]) -> None:
    cluster = report["cluster"]
    print(f"meshq bench queue: {cluster['nodes']} nodes, replication factor {cluster['replication_factor']}, "
          f"{cluster['partitions']} partitions, {cluster['workers']} worker processes, {cluster['jobs']} records of "
          f"{report['config']['value_bytes']} bytes per round, per-record ack")
    print(f"command: {report['config']['command']}")
    for i, r in enumerate(cluster["rounds"]):
        s, b = r["shared"], r["baseline"]
        print(f"  round {i + 1}: shared {s['acked_per_s']:>8} acked/s  {s['cpu_us_per_record']:>7} CPU µs/record  "
              f"wall {s['wall_s']} s | baseline stream read {b['records_per_s']:>8} rec/s  "
              f"({s['ratio_to_baseline']}x)")
    if "summary" in cluster:
        for key, spread in cluster["summary"].items():
            print(f"  {key}: median {spread['median']}  min {spread['min']}  max {spread['max']}")
    for peer, entry in cluster.get("peers", {}).items():
        if isinstance(entry, str):
            print(f"  {peer}: {entry}")
            continue
        print(f"  {peer}: same records and workers, each record acked individually")
        for i, r in enumerate(entry["rounds"]):
            print(f"    round {i + 1}: {r['acked_per_s']:>8} acked/s  {r['cpu_us_per_record']:>7} CPU µs/record  "
                  f"wall {r['wall_s']} s | preload {r['preload_records_per_s']} rec/s | meshq/peer "
                  f"{r.get('meshq_ratio', '-')}x")
        for key, spread in entry.get("summary", {}).items():
            print(f"    {key}: median {spread['median']}  min {spread['min']}  max {spread['max']}")
        if "error" in entry:
            print(f"    error: {entry['error']}")
    if "error" in cluster:
        print(f"  error: {cluster['error']}")
