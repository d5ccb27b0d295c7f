"""``meshq bench compare``: meshq RF 3 ``acks=quorum`` against NATS JetStream R3, Redis streams and RabbitMQ
quorum queues, alternating round by round, as one table of ratios (issue #18 items 2, 4 and 5).

Theory of operation
-------------------
Every system runs on 127.0.0.1 for the whole run, started by this module and stopped by the PID
it started (also on error and Ctrl-C, in ``finally``):

- meshq: three ``meshq node`` children (``procs._Cluster``, ``--fsync`` as given, ``interval`` by
  default: JetStream does not fsync per message either), topics of 8 partitions with replication
  factor 3, produced at ``acks=quorum`` by a client node in this process;
- NATS JetStream: three ``nats-server -js`` children in one cluster, a stream with
  ``num_replicas=3`` and file storage per round, the nats-py client in this process (its own
  asyncio loop, run only while a part runs);
- Redis streams and RabbitMQ quorum queues: the servers of ``bench queue`` (queue_peers.py),
  when installed; otherwise the report says "not installed: not measured" (``--peers`` picks).

A round of one system, on a fresh topic / stream / queue: pipelined produce of ``--records``
messages one per call, the way each client pipelines (meshq ``produce_async`` then ``flush``;
JetStream ``publish_async`` then ``publish_async_completed``; Redis XADD pipelined ``--batch``
commands at a time; RabbitMQ publisher confirms with at most 1000 unconfirmed); then
``--sync-records`` synchronous produces, each timed (after a warm-up); then one consumer reads
everything the round stored (meshq ``consumer`` without a group over every partition, JetStream
a pull consumer with ``AckPolicy.NONE`` fetching 1000 at a time, Redis XREAD 1000 at a time,
RabbitMQ ``basic_consume`` with auto-ack and prefetch 2000: no per-message ack anywhere). Rounds
alternate the systems (the order turns each round), so drift of the shared machine's load hits
all of them. Each part's wall time and the CPU time (user + system, /proc per thread, what
rusage adds up) of the client (this process) and of the servers (with their child processes)
are divided by the messages.

meshq only (issue #18 item 4): per round a topic preloaded with ``produce_batch`` and read by a
consumer group of ``--consumers`` worker processes (this module's ``main``: a client node each).
They join the group while the topic is still empty, hold (stop polling) once their assignments
cover every partition without overlap, the topic is preloaded, and on ``go`` each reads its
partitions' records (up to their high watermarks, from status) and reports the wall clock of its last
record: the group's rate is the records over the time from ``go`` to the last one. Members leave the
group only once all are done (one leaving earlier is a rebalance: the others would read its partitions
again, timed). Delivery is at-least-once: if a rebalance still happens during the read (a member's
session ran out), records may be read twice (``read_again``); a record read by no member is an error.

The report gives each figure's median over the rounds with min and max, and the ratios
meshq / peer of the medians (throughput: higher is better for meshq; latency: lower).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from meshq.bench.console import _progress
from meshq.bench.cpu import _CpuSampler, cpu_us_per_record
from meshq.bench.errors import BenchError, _error_text
from meshq.bench.procs import PARTITIONS, READY_TIMEOUT_S, _Child, _Cluster
from meshq.bench.produce import _pipelined_async, _pipelined_batch, _synchronous, _values
from meshq.bench.queue_peers import _missing, _Peer, _RabbitMQ, _Redis, _wait_port
from meshq.bench.stats import _percentiles_us
from meshq.bench.status import (
    CLUSTER_READY_TIMEOUT_S,
    _start_with_client,
    _topic_partitions,
    _wait_cluster,
    _wait_high_watermarks,
)
from meshq.errors import MeshqError
from meshq.testing.ports import free_port

PEER_NAMES = ("nats", "redis", "rabbitmq")
SYSTEM_LABELS = {"meshq": "meshq RF3 acks=quorum", "nats": "NATS JetStream R3", "redis": "Redis streams",
                 "rabbitmq": "RabbitMQ quorum queue"}
CLIENT_LABELS = ("client", "worker")  # CPU of these processes is the client side; the rest is the servers'
FETCH = 1000  # messages per consumer read call (meshq poll max_records, JetStream fetch, XREAD count)
SYNC_WARMUP = 200
PART_TIMEOUT_S = 300.0
PARTS = ("produce", "sync", "consume")


def _part(ops: int, seconds: float, cpu: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One timed part: rate, wall and CPU µs per message of the client and of the servers."""
    per = cpu_us_per_record(cpu, ops)
    client = sum(v for k, v in per.items() if k != "all" and k.startswith(CLIENT_LABELS))
    servers = sum(v for k, v in per.items() if k != "all" and not k.startswith(CLIENT_LABELS))
    return {"ops": ops, "seconds": round(seconds, 4), "ops_per_s": ops / seconds if seconds > 0 else 0.0,
            "wall_us_per_op": 1e6 * seconds / ops if ops else 0.0, "cpu_client_us_per_op": round(client, 2),
            "cpu_servers_us_per_op": round(servers, 2), "machine_other_percent": cpu.get("other_percent"), **extra}


def _sync_part(samples_ns: list[int], seconds: float, cpu: dict[str, Any]) -> dict[str, Any]:
    latency = _percentiles_us(samples_ns)
    return _part(len(samples_ns), seconds, cpu, p50_us=latency["p50_us"], p99_us=latency["p99_us"])


def _timed(processes: dict[str, int], ops: int, body: Callable[[], Any]) -> dict[str, Any]:
    sampler = _CpuSampler(processes)
    sampler.start()
    start = time.perf_counter()
    body()
    seconds = time.perf_counter() - start
    sampler.stop()
    return _part(ops, seconds, sampler.summary())


def _timed_sync(processes: dict[str, int], ops: int, call: Callable[[], Any]) -> dict[str, Any]:
    for _ in range(min(SYNC_WARMUP, ops)):
        call()
    clock = time.perf_counter_ns
    samples: list[int] = []
    sampler = _CpuSampler(processes)
    sampler.start()
    start = time.perf_counter()
    for _ in range(ops):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    seconds = time.perf_counter() - start
    sampler.stop()
    return _sync_part(samples, seconds, sampler.summary())


def _deadline_check(start: float, what: str) -> None:
    if time.monotonic() - start > PART_TIMEOUT_S:
        raise BenchError(f"{what} took longer than {PART_TIMEOUT_S:.0f} s; aborted")


# ------------------------------------------------------------------ meshq
class _Meshq:
    name = "meshq"

    def __init__(self, args: Any, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.run_id = uuid.uuid4().hex[:8]
        self.cluster = _Cluster(3, workdir, args, 3)
        self.workers: list[_Child] = []
        self.info: dict[str, Any] = {"nodes": 3, "replication_factor": 3, "acks": "quorum", "fsync": args.fsync,
                                     "partitions": PARTITIONS}
        self.client: Any = None
        try:
            self.client = _start_with_client(args, self.cluster, self.info)
            for index in range(args.consumers):
                self.workers.append(self._start_worker(index))
            for worker in self.workers:
                worker.wait_event("ready", READY_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.values = _values(args.batch, args.value_bytes)

    def _start_worker(self, index: int) -> _Child:
        argv = [sys.executable, "-m", "meshq.bench.compare", "--seeds", ",".join(self.cluster.seeds),
                "--cluster", self.args.cluster]
        return _Child(argv, os.path.join(self.workdir, f"group-worker{index + 1}.stderr"), commands=True)

    def pids(self) -> dict[str, int]:
        return {**self.cluster.pids(), **{f"worker{i + 1}": w.pid for i, w in enumerate(self.workers)}}

    def _processes(self) -> dict[str, int]:
        return {"client": os.getpid(), **self.cluster.pids()}

    def _topic(self, kind: str, number: int) -> str:
        topic = f"compare-{self.run_id}-{kind}{number}"
        self.client.create_topic(topic, partitions=PARTITIONS, replication_factor=3, retention_ms=None)
        status, problem = _wait_cluster(self.client, topic, self.cluster, CLUSTER_READY_TIMEOUT_S, need_in_sync=True)
        if status is None:
            raise BenchError(f"the cluster did not get ready for {topic}: {problem}")
        return topic

    def round(self, number: int) -> dict[str, Any]:
        args = self.args
        topic = self._topic("r", number)
        produced = _pipelined_async(self.client, topic, args.records, self.values, "quorum",
                                    _CpuSampler(self._processes()))
        out = {"produce": _part(args.records, produced["seconds"], produced["cpu"])}
        stored = produced["acknowledged"]
        if args.sync_records > 0:
            sync = _synchronous(self.client, topic, args.sync_records, self.values, "quorum",
                                _CpuSampler(self._processes()))
            out["sync"] = _sync_part_from(sync)
            stored += sync["acknowledged"]
        out["consume"] = self._consume(topic, stored)
        return out

    def _consume(self, topic: str, expected: int) -> dict[str, Any]:
        consumer = self.client.consumer(topic, start="earliest")  # no group: every partition
        try:
            got = 0
            poll = consumer.poll

            def read() -> None:
                nonlocal got
                started = time.monotonic()
                while got < expected:
                    got += len(poll(timeout=1.0, max_records=FETCH))
                    _deadline_check(started, "the meshq consumer")

            part = _timed(self._processes(), expected, read)
        finally:
            consumer.close()
        if got != expected:
            raise BenchError(f"the meshq consumer read {got} records, {expected} were stored")
        return part

    def group_round(self, number: int) -> dict[str, Any]:
        """A topic preloaded with ``--records`` by produce_batch, read by the group of worker processes."""
        topic = self._topic("g", number)
        group = f"{topic}-group"
        for worker in self.workers:
            worker.send(f"join {topic} {group}")
        for worker in self.workers:
            worker.wait_event("joined", READY_TIMEOUT_S)
        assignments = self._hold_when_assigned()
        preload = _pipelined_batch(self.client, topic, self.args.records, self.values, "quorum",
                                   _CpuSampler(self._processes()), repeats=1)
        stored = _wait_high_watermarks(self.client, topic, preload["acknowledged"], 30.0)
        if stored != preload["acknowledged"]:
            raise BenchError(f"{topic} holds {stored} records, {preload['acknowledged']} were acknowledged")
        watermarks = {p["partition"]: p["high_watermark"]
                      for p in _topic_partitions(self.client.status(timeout=10.0), topic)}
        shares = [sum(watermarks[p] for p in partitions) for partitions in assignments]
        sampler = _CpuSampler({**self.cluster.pids(), **{f"worker{i + 1}": w.pid for i, w in enumerate(self.workers)}})
        sampler.start()
        go_wall = time.time()
        for worker, partitions in zip(self.workers, assignments):
            worker.send("go " + json.dumps({p: watermarks[p] for p in partitions}, separators=(",", ":")))
        done = [worker.wait_event("done", PART_TIMEOUT_S) for worker in self.workers]
        sampler.stop()
        for worker in self.workers:  # (only now: a member leaving while another still reads is a rebalance)
            worker.send("leave")
        # At-least-once: a rebalance during the read (a member's session ran out on a loaded machine) hands
        # partitions to a member that reads them again from the group's committed offsets, so a member may
        # read more than its share; what may not happen is that some record of a partition is read by none.
        reached = {p: max((d["reached"].get(str(p), 0) for d in done), default=0) for p in watermarks}
        unread = {p: (reached[p], hw) for p, hw in watermarks.items() if reached[p] < hw}
        if unread:
            raise BenchError("the group did not read every stored record: "
                             + ", ".join(f"partition {p} read to offset {got} of {hw}"
                                         for p, (got, hw) in sorted(unread.items())))
        seconds = max(d["last"] for d in done if d["last"] is not None) - go_wall
        read = sum(d["count"] for d in done)
        return {"consume_group": _part(stored, seconds, sampler.summary(), members=len(self.workers),
                                       per_member=shares, read_again=read - stored)}

    def _hold_when_assigned(self) -> list[list[int]]:
        """Wait until the members' assignments cover every partition without overlap, holding them
        there (no polls) so none reads the preload early; returns each member's partitions."""
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
        seen: list[list[int]] = []
        while time.monotonic() < deadline:
            for worker in self.workers:
                worker.send("hold")
            seen = [sorted(worker.wait_event("held", READY_TIMEOUT_S)["partitions"]) for worker in self.workers]
            flat = [p for partitions in seen for p in partitions]
            if sorted(flat) == list(range(PARTITIONS)) and all(seen):
                return seen
            for worker in self.workers:
                worker.send("resume")
            time.sleep(0.2)
        raise BenchError(f"the group of {len(self.workers)} did not settle on an assignment of the "
                         f"{PARTITIONS} partitions within {CLUSTER_READY_TIMEOUT_S:.0f} s: last seen {seen}")

    def stop(self) -> None:
        try:
            for worker in self.workers:
                try:
                    worker.stop()
                except Exception:  # keep going: the nodes must still be stopped
                    pass
            if self.client is not None:
                self.client.stop()
        finally:
            self.cluster.stop()


def _sync_part_from(sync: dict[str, Any]) -> dict[str, Any]:
    """``produce._synchronous``'s result as a part of this report."""
    return _part(sync["records"], sync["seconds"], sync["cpu"], p50_us=sync["p50_us"], p99_us=sync["p99_us"])


# ------------------------------------------------------------------ NATS JetStream R3
class _JetStream(_Peer):
    name, kind = "nats", "nats"

    def __init__(self, workdir: str, value_bytes: int) -> None:
        super().__init__(workdir)
        self.value = b"x" * value_bytes
        self.loop = asyncio.new_event_loop()
        self.nc: Any = None
        try:
            client_ports = [self.port, free_port(), free_port()]
            route_ports = [free_port() for _ in range(3)]
            procs = []
            for i in range(3):
                name = f"n{i + 1}"
                routes = ", ".join(f"nats-route://127.0.0.1:{route_ports[j]}" for j in range(3) if j != i)
                config = os.path.join(self.dir, f"{name}.conf")
                with open(config, "w") as f:
                    f.write(f'server_name: {name}\nlisten: 127.0.0.1:{client_ports[i]}\n'
                            f'jetstream {{ store_dir: "{os.path.join(self.dir, name, "store")}" }}\n'
                            f'cluster {{ name: r3, listen: 127.0.0.1:{route_ports[i]}, routes: [{routes}] }}\n')
                procs.append(self._spawn([shutil.which("nats-server") or "nats-server", "-c", config,
                                          "-l", os.path.join(self.dir, f"{name}.log")], name))
            for port, proc in zip(client_ports, procs):
                _wait_port(port, proc, "nats-server")
            self.nc, self.js = self.loop.run_until_complete(self._connect(client_ports))
        except BaseException:
            self.stop()
            raise

    async def _connect(self, ports: list[int]) -> tuple[Any, Any]:
        import nats

        nc = await nats.connect(servers=[f"nats://127.0.0.1:{p}" for p in ports], pending_size=64 * 1024 * 1024)
        return nc, nc.jetstream()

    def _stream(self, number: int) -> tuple[str, str]:
        from nats.js.api import StorageType

        name = f"compare{uuid.uuid4().hex[:8]}r{number}"

        async def create() -> None:
            deadline = time.monotonic() + 60
            while True:  # the cluster's meta leader may still be electing
                try:
                    await self.js.add_stream(name=name, subjects=[f"{name}.x"], num_replicas=3,
                                             storage=StorageType.FILE)
                    return
                except Exception as exc:  # noqa: BLE001 (nats-py raises several kinds while electing)
                    if time.monotonic() > deadline:
                        raise BenchError(f"NATS JetStream did not create an R3 stream within 60 s: {exc}") from None
                    await asyncio.sleep(0.25)

        self.loop.run_until_complete(create())
        return name, f"{name}.x"

    def round(self, args: Any, number: int) -> dict[str, Any]:
        name, subject = self._stream(number)
        processes = {"client": os.getpid(), **self.server_pids()}
        js, value, run = self.js, self.value, self.loop.run_until_complete
        try:
            async def produce() -> None:
                futures = [await js.publish_async(subject, value) for _ in range(args.records)]
                await js.publish_async_completed()
                failed = [f for f in futures if f.exception() is not None]
                if failed:
                    raise BenchError(f"{len(failed)} JetStream publishes failed: {failed[0].exception()!r}")

            out = {"produce": _timed(processes, args.records, lambda: run(produce()))}
            if args.sync_records > 0:
                async def sync() -> dict[str, Any]:
                    publish = js.publish
                    for _ in range(min(SYNC_WARMUP, args.sync_records)):
                        await publish(subject, value)
                    clock = time.perf_counter_ns
                    samples: list[int] = []
                    sampler = _CpuSampler(processes)
                    sampler.start()
                    start = time.perf_counter()
                    for _ in range(args.sync_records):
                        t0 = clock()
                        await publish(subject, value)
                        samples.append(clock() - t0)
                    seconds = time.perf_counter() - start
                    sampler.stop()
                    return _sync_part(samples, seconds, sampler.summary())

                out["sync"] = run(sync())
            expected = run(js.stream_info(name)).state.messages
            out["consume"] = run(self._consume(subject, expected, processes))
            return out
        finally:
            run(js.delete_stream(name))

    async def _consume(self, subject: str, expected: int, processes: dict[str, int]) -> dict[str, Any]:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        psub = await self.js.pull_subscribe(subject, config=ConsumerConfig(ack_policy=AckPolicy.NONE,
                                                                           deliver_policy=DeliverPolicy.ALL))
        try:
            got = 0
            sampler = _CpuSampler(processes)
            sampler.start()
            start, started = time.perf_counter(), time.monotonic()
            while got < expected:
                got += len(await psub.fetch(min(FETCH, expected - got), timeout=5))
                _deadline_check(started, "the JetStream consumer")
            seconds = time.perf_counter() - start
            sampler.stop()
            return _part(expected, seconds, sampler.summary())
        finally:
            await psub.unsubscribe()

    def stop(self) -> None:
        try:  # (after a Ctrl-C inside a part the loop may refuse both: the servers are stopped either way)
            if self.nc is not None:
                self.loop.run_until_complete(self.nc.close())
            self.loop.close()
        except Exception:
            pass
        super().stop()


# ------------------------------------------------------------------ Redis streams and RabbitMQ quorum queues
class _RedisStreams(_Redis):
    name, kind = "redis", "redis"

    def round(self, args: Any, number: int) -> dict[str, Any]:
        stream = f"compare-{uuid.uuid4().hex[:8]}-{number}"
        processes = {"client": os.getpid(), **self.server_pids()}
        r = self._client()
        value = b"x" * args.value_bytes
        try:
            out = {"produce": _timed(processes, args.records,
                                     lambda: self.preload(stream, args.records, args.value_bytes, args.batch))}
            if args.sync_records > 0:
                out["sync"] = _timed_sync(processes, args.sync_records, lambda: r.xadd(stream, {"v": value}))
            expected = r.xlen(stream)
            got = 0

            def read() -> None:
                nonlocal got
                last, started = "0", time.monotonic()
                while got < expected:
                    for _name, entries in r.xread({stream: last}, count=FETCH) or ():
                        got += len(entries)
                        last = entries[-1][0]
                    _deadline_check(started, "the Redis consumer")

            out["consume"] = _timed(processes, expected, read)
            return out
        finally:
            r.close()
            self.cleanup(stream)


class _RabbitQuorum(_RabbitMQ):
    name, kind = "rabbitmq", "rabbitmq"

    def round(self, args: Any, number: int) -> dict[str, Any]:
        import pika

        name = f"compare-{uuid.uuid4().hex[:8]}-{number}"
        processes = {"client": os.getpid(), **self.server_pids()}
        value = b"x" * args.value_bytes
        try:
            out = {"produce": _timed(processes, args.records,
                                     lambda: self.preload(name, args.records, args.value_bytes, args.batch))}
            connection = self._connect()
            try:
                channel = connection.channel()
                if args.sync_records > 0:
                    channel.confirm_delivery()  # each basic_publish waits for its confirm
                    properties = pika.BasicProperties(delivery_mode=2)
                    out["sync"] = _timed_sync(processes, args.sync_records,
                                              lambda: channel.basic_publish("", name, value, properties))
                expected = channel.queue_declare(name, durable=True, passive=True).method.message_count
                channel.basic_qos(prefetch_count=2 * FETCH)
                got = 0

                def on_message(_ch: Any, _method: Any, _properties: Any, _body: bytes) -> None:
                    nonlocal got
                    got += 1

                def read() -> None:
                    started = time.monotonic()
                    channel.basic_consume(name, on_message, auto_ack=True)
                    while got < expected:
                        connection.process_data_events(time_limit=0.05)
                        _deadline_check(started, "the RabbitMQ consumer")

                out["consume"] = _timed(processes, expected, read)
            finally:
                connection.close()
            return out
        finally:
            self.cleanup(name)


PEER_CLASSES = {"nats": (_JetStream, "nats-server", "nats"), "redis": (_RedisStreams, "redis-server", "redis"),
                "rabbitmq": (_RabbitQuorum, "rabbitmq-server", "pika")}


def _start_peer(name: str, workdir: str, args: Any) -> tuple[Any, str | None]:
    """(the started peer, None) or (None, why it is not measured)."""
    cls, server, module = PEER_CLASSES[name]
    why = _missing(server, module)
    if why is not None:
        return None, why
    _progress(f"starting {SYSTEM_LABELS[name]}")
    try:
        return (cls(workdir, args.value_bytes) if cls is _JetStream else cls(workdir)), None
    except Exception as exc:  # the constructor stopped what it started; the others go on
        return None, f"{server} did not start ({type(exc).__name__}: {exc}): not measured"


# ------------------------------------------------------------------ the run
def run_compare(args: Any, workdir: str) -> dict[str, Any]:
    """Start every system, run ``--rounds`` alternating rounds, stop everything; returns the report's body."""
    systems: list[Any] = []
    notes: dict[str, str] = {}
    rounds: dict[str, list[dict[str, Any]]] = {}
    out: dict[str, Any] = {"systems": notes, "rounds": rounds}
    try:
        _progress("starting meshq: 3 nodes, replication factor 3")
        meshq = _Meshq(args, workdir)
        systems.append(meshq)
        out["meshq"] = meshq.info
        notes["meshq"] = "measured"
        for name in args.peers:
            peer, why = _start_peer(name, workdir, args)
            notes[name] = why or "measured"
            if peer is not None:
                systems.append(peer)
        for number in range(args.rounds):
            turn = number % len(systems)
            for system in systems[turn:] + systems[:turn]:
                _progress(f"round {number + 1} of {args.rounds}: {SYSTEM_LABELS[system.name]}")
                try:
                    result = system.round(number) if system is meshq else system.round(args, number)
                    if system is meshq and meshq.workers:
                        result.update(meshq.group_round(number))
                except (BenchError, MeshqError, TimeoutError, OSError, RuntimeError) as exc:
                    result = {"error": _error_text(exc)}
                except Exception as exc:  # a peer client's own error types: recorded, the run goes on
                    result = {"error": _error_text(exc)}
                rounds.setdefault(system.name, []).append(result)
        out["server_pids"] = {system.name: sorted(system.pids().values() if system is meshq
                                                  else system.server_pids().values()) for system in systems}
    finally:
        for system in reversed(systems):
            try:
                system.stop()
            except Exception:  # keep going: every other system must still be stopped
                pass
    out["summary"] = {name: _summarise(results) for name, results in rounds.items()}
    out["ratios"], out["targets"] = _ratios(out["summary"], args.consumers)
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over the rounds of each part's figures; the errors of failed rounds."""
    out: dict[str, Any] = {"rounds_measured": sum(1 for r in results if "error" not in r),
                           "errors": [r["error"] for r in results if "error" in r]}
    for part in (*PARTS, "consume_group"):
        rows = [r[part] for r in results if part in r]
        if not rows:
            continue
        summary = {key: _spread([row[key] for row in rows])
                   for key in ("ops_per_s", "wall_us_per_op", "cpu_client_us_per_op", "cpu_servers_us_per_op")}
        for key in ("p50_us", "p99_us"):
            if key in rows[0]:
                summary[key] = _spread([row[key] for row in rows])
        others = [row["machine_other_percent"] for row in rows if row.get("machine_other_percent") is not None]
        summary["machine_other_percent"] = _spread(others) if others else None
        summary["ops"] = rows[0]["ops"]
        out[part] = summary
    return out


ROWS = (("produce", "ops_per_s", "pipelined produce, msg/s", True),
        ("sync", "p50_us", "sync produce p50, µs", False),
        ("sync", "p99_us", "sync produce p99, µs", False),
        ("consume", "ops_per_s", "consume (one consumer), msg/s", True))


def _ratios(summary: dict[str, Any], consumers: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """meshq / peer of each row's medians; the issue's targets (against JetStream R3, and the consume
    rates: the group's only with ``--consumers 3``)."""
    ratios: dict[str, Any] = {}
    mine = summary.get("meshq", {})
    for part, key, label, _higher in ROWS:
        row = {}
        for peer in PEER_NAMES:
            theirs = summary.get(peer, {}).get(part, {}).get(key)
            if part in mine and theirs and theirs["median"] > 0:
                row[peer] = mine[part][key]["median"] / theirs["median"]
        ratios[label] = row
    targets = []
    for _part_name, _key, label, higher in ROWS:
        value = ratios[label].get("nats")
        goal = 3.0 if higher else 1.0
        targets.append({"name": f"{label}: meshq / JetStream R3 {'>=' if higher else '<='} {goal:g}",
                        "value": value, "met": None if value is None else (value >= goal if higher else value <= goal)})
    group = mine.get("consume_group", {}).get("ops_per_s") if consumers == 3 else None
    single = mine.get("consume", {}).get("ops_per_s")
    targets.append({"name": "one consumer of a 3-replica topic >= 1,000,000 rec/s",
                    "value": single["median"] if single else None,
                    "met": None if single is None else single["median"] >= 1_000_000})
    targets.append({"name": "a consumer group of 3 >= 2,000,000 rec/s total",
                    "value": group["median"] if group else None,
                    "met": None if group is None else group["median"] >= 2_000_000})
    return ratios, targets


def compare_errors(report: dict[str, Any]) -> list[str]:
    """What could not be measured (a failed round, a run that stopped): the exit status is 1 then."""
    errors = [f"{name} round: {error}" for name, summary in report["compare"]["summary"].items()
              for error in summary["errors"]]
    if "error" in report["compare"]:
        errors.append(report["compare"]["error"])
    return errors


# ------------------------------------------------------------------ the table
def _cell(spread: dict[str, float] | None, digits: int = 0) -> str:
    if not spread:
        return ""
    return f"{spread['median']:,.{digits}f} [{spread['min']:,.{digits}f}–{spread['max']:,.{digits}f}]"


def render_compare(report: dict[str, Any]) -> None:
    from rich.table import Table

    from meshq.bench.console import _print_load_warning, _print_targets, _wide_console

    console = _wide_console("compare", report["machine"])
    c = report["config"]
    body = report["compare"]
    console.print(f"records={c['records']:,} sync_records={c['sync_records']:,} value_bytes={c['value_bytes']} "
                  f"rounds={c['rounds']} fsync={c['fsync']} (JetStream does not fsync per message either) "
                  f"consumers={c['consumers']}")
    for name, note in body["systems"].items():
        if note != "measured":
            console.print(f"{SYSTEM_LABELS[name]}: {note}")
    summary = body["summary"]
    names = [n for n in ("meshq", *PEER_NAMES) if n in summary]
    table = Table(title=f"median [min–max] of {c['rounds']} alternating rounds; ratio = meshq / peer")
    table.add_column("row")
    for name in names:
        table.add_column(SYSTEM_LABELS[name], justify="right")
    for name in names[1:]:
        table.add_column(f"meshq/{name}", justify="right")
    for part, key, label, _higher in ROWS:
        cells = [_cell(summary[n].get(part, {}).get(key)) for n in names]
        ratios = [f"{body['ratios'][label][n]:.2f}×" if n in body["ratios"][label] else "" for n in names[1:]]
        table.add_row(label, *cells, *ratios)
    group = summary.get("meshq", {}).get("consume_group")
    if group:
        table.add_row(f"consume, group of {c['consumers']} processes, msg/s", _cell(group["ops_per_s"]),
                      *[""] * (2 * len(names) - 2))
    console.print(table)
    cpu = Table(title="wall and CPU µs per message (medians; client = this process or the group's workers, "
                      "servers = every server process)")
    for column in ("system", "part", "wall", "client CPU", "servers CPU", "other procs, % of a core"):
        cpu.add_column(column, justify="left" if column in ("system", "part") else "right")
    for name in names:
        for part in (*PARTS, "consume_group"):
            row = summary[name].get(part)
            if row:
                cpu.add_row(SYSTEM_LABELS[name], part, f"{row['wall_us_per_op']['median']:.1f}",
                            f"{row['cpu_client_us_per_op']['median']:.1f}",
                            f"{row['cpu_servers_us_per_op']['median']:.1f}",
                            "" if row.get("machine_other_percent") is None
                            else f"{row['machine_other_percent']['median']:.0f}")
    console.print(cpu)
    _print_targets(console, "Targets (issue #18)",
                   [(t["name"], "" if t["value"] is None else
                     (f"{t['value']:,.0f}" if t["value"] > 100 else f"{t['value']:.2f}×"), t["met"])
                    for t in body["targets"]])
    for error in report["errors"]:
        console.print(f"[red]{error}[/red]")
    _print_load_warning(console, report)


# ------------------------------------------------------------------ a group member (a worker process)
def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _worker(seeds: list[str], cluster: str) -> None:
    """A consumer-group member: ``join TOPIC GROUP``, ``hold`` / ``resume``, ``go {PARTITION: HIGH_WATERMARK}``
    (read until each of those partitions is read to its high watermark, then report the wall clock of the
    last record, the records read and how far each partition was read), ``leave`` (the group: only once every
    member is done, or the others rebalance and read again while still timed), ``exit``; one JSON line
    answers each of join, hold and go."""
    from meshq.node import Node

    commands: queue.Queue = queue.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            commands.put(line.split())
        commands.put(["exit"])

    threading.Thread(target=read_commands, daemon=True).start()
    with Node(cluster=cluster, seeds=seeds, mdns=False, role="client") as node:
        node.wait_ready(READY_TIMEOUT_S)
        _say(event="ready", pid=os.getpid())
        consumer: Any = None
        polling = False
        while True:
            try:
                command = commands.get(timeout=0.05 if polling else None)
            except queue.Empty:
                consumer.poll(timeout=0.05)  # (the topic is still empty: this only moves the membership on)
                continue
            if command[0] == "exit":
                break
            if command[0] == "join":
                if consumer is not None:
                    consumer.close()
                consumer = node.consumer(command[1], group=command[2], auto_commit=False)
                polling = True
                _say(event="joined")
            elif command[0] == "hold":
                polling = False
                _say(event="held", partitions=consumer.assignment())
            elif command[0] == "resume":
                polling = True
            elif command[0] == "go":
                want = {int(p): hw for p, hw in json.loads(command[1]).items()}
                reached: dict[int, int] = {}  # partition -> one past the highest offset read
                got, last = 0, None
                deadline = time.monotonic() + PART_TIMEOUT_S
                poll = consumer.poll
                while any(reached.get(p, 0) < hw for p, hw in want.items()) and time.monotonic() < deadline:
                    records = poll(timeout=1.0, max_records=FETCH)
                    if records:
                        got += len(records)
                        last = time.time()
                        for partition, offset in {r.partition: r.offset for r in records}.items():  # (in order)
                            if offset >= reached.get(partition, 0):
                                reached[partition] = offset + 1
                _say(event="done", count=got, last=last, reached=reached)
            elif command[0] == "leave" and consumer is not None:
                consumer.close()
                consumer = None
        if consumer is not None:
            consumer.close()


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="a consumer-group member of meshq bench compare")
    parser.add_argument("--seeds", required=True)
    parser.add_argument("--cluster", required=True)
    parsed = parser.parse_args()
    _worker(parsed.seeds.split(","), parsed.cluster)
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
