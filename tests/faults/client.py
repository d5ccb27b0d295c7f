"""The fault run's client processes, each run inside the lab's client namespace through the public API only.

``python -m tests.faults.client produce ...``: one thread per partition, each calling ``Node.produce`` (acks="quorum",
synchronous) with a value unique to the attempt (a failed call is never re-sent with the same value, so an
acknowledged value must be stored exactly once) at about ``--rate`` records/s in total. Every attempt is one JSON
line ``[partition, offset, value, started_s, ended_s, error]`` in ``--out`` (offset and error null as fits;
``time.monotonic()`` is system-wide on Linux, so the runner compares it with its own fault times).

``python -m tests.faults.client consume ...``: a consumer from the earliest offset (no group) polling throughout;
each record seen is a line ``[partition, offset, value, seen_s]`` in ``--out`` (the checker requires that every
record a consumer saw during the faults is the one the final log holds at that position).

``python -m tests.faults.client drain --high-watermarks JSON ...``: read every partition from offset 0 up to the
given high watermarks (then one more poll) and write each record as ``[partition, offset, value]``.

produce and consume run until their stdin closes; each prints ``{"ready": true}`` once its client is up.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import meshq
from meshq.errors import MeshqError


def _client(args: argparse.Namespace) -> meshq.Node:
    client = meshq.Node(cluster=args.cluster, role="client", seeds=args.seed, mdns=False, host=args.host).start()
    client.wait_ready(timeout=60)
    return client


def _error_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__name__ if cls.__module__.startswith("meshq") else f"{cls.__module__}.{cls.__qualname__}"


def produce(args: argparse.Namespace) -> int:
    client = _client(args)
    stop = threading.Event()
    lock = threading.Lock()
    out = open(args.out, "a", buffering=1, encoding="utf-8")
    period_s = args.partitions / args.rate  # per thread

    def write(line: list) -> None:
        with lock:
            out.write(json.dumps(line) + "\n")

    def run(partition: int) -> None:
        index = 0
        while not stop.is_set():
            value = f"{args.name}-p{partition}-{index:09d}"
            index += 1
            started = time.monotonic()
            try:
                md = client.produce(args.topic, value.encode(), partition=partition, acks="quorum",
                                    timeout=args.timeout)
            except Exception as exc:  # every outcome is evidence; the checker judges them
                write([partition, None, value, started, time.monotonic(), _error_name(exc)])
                stop.wait(0.05)
                continue
            ended = time.monotonic()
            write([partition, md.offset, value, started, ended, None])
            stop.wait(max(0.0, period_s - (ended - started)))

    threads = [threading.Thread(target=run, args=(p,), name=f"produce-p{p}", daemon=True)
               for p in range(args.partitions)]
    for thread in threads:
        thread.start()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
    stop.set()
    for thread in threads:
        thread.join(args.timeout + 30)
    stuck = [t.name for t in threads if t.is_alive()]
    out.close()
    client.stop()
    print(json.dumps({"done": True, "stuck": stuck}), flush=True)
    return 3 if stuck else 0


def consume(args: argparse.Namespace) -> int:
    client = _client(args)
    stop = threading.Event()
    errors: dict[str, int] = {}
    out = open(args.out, "a", buffering=1, encoding="utf-8")

    def run() -> None:
        consumer = None
        while not stop.is_set():
            try:
                if consumer is None:
                    consumer = client.consumer(args.topic, start="earliest", timeout=5)
                for r in consumer.poll(timeout=0.5, max_records=2000):
                    out.write(json.dumps([r.partition, r.offset, r.value.decode(), time.monotonic()]) + "\n")
            except MeshqError as exc:
                errors[_error_name(exc)] = errors.get(_error_name(exc), 0) + 1
                stop.wait(0.2)
        if consumer is not None:
            consumer.close()

    thread = threading.Thread(target=run, name="consume", daemon=True)
    thread.start()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
    stop.set()
    thread.join(60)
    out.close()
    client.stop()
    print(json.dumps({"done": True, "errors": errors, "stuck": thread.is_alive()}), flush=True)
    return 3 if thread.is_alive() else 0


def drain(args: argparse.Namespace) -> int:
    high_watermarks = {int(p): hw for p, hw in json.loads(args.high_watermarks).items()}
    client = _client(args)
    try:
        deadline = time.monotonic() + 120
        consumer = None
        while consumer is None:
            try:
                consumer = client.consumer(args.topic, start="earliest", timeout=5)
            except MeshqError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with open(args.out, "w", encoding="utf-8") as out:
            def keep(records: list) -> None:
                for r in records:
                    out.write(json.dumps([r.partition, r.offset, r.value.decode()]) + "\n")

            while (any(consumer.position(p) < hw for p, hw in high_watermarks.items())
                   and time.monotonic() < deadline):
                try:
                    keep(consumer.poll(timeout=0.5, max_records=10_000))
                except MeshqError:
                    time.sleep(0.2)
            keep(consumer.poll(timeout=1.0, max_records=10_000))  # anything past a high watermark shows up here
        consumer.close()
    finally:
        client.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.client")
    parser.add_argument("mode", choices=["produce", "consume", "drain"])
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--seed", action="append", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default="w")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--rate", type=float, default=200.0, help="records/s over all partitions (at most)")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--high-watermarks", default="{}")
    args = parser.parse_args(argv)
    return {"produce": produce, "consume": consume, "drain": drain}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
