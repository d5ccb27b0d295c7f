"""``meshq bench pubsub``: publish -> subscribe throughput across processes, against raw pyzmq and NATS core.

Theory of operation
-------------------
Every measured system runs as separate worker processes of this module
(``python -m meshq.bench.pubsub ROLE ...``): one publisher and K subscribers, each in a
process of its own, all on 127.0.0.1. A round starts fresh processes; the coordinator waits
until every subscriber is ready (for meshq: until the publisher routes the subject to K
nodes), tells the publisher to go, and collects one JSON line from each worker: the
publisher's start and end (wall clock of the host) and every worker's CPU time (rusage).
A subscriber counts messages until it has all of them or hears nothing for ``IDLE_S``.
The throughput of one subscriber is what it received divided by the time from the
publisher's first publish to its own last message; a round's figure is the slowest
subscriber's. Each system is measured ``--rounds`` times (median, min, max).

Systems: ``meshq`` (publisher: a storage node; subscribers: client nodes seeded to it),
``pyzmq`` (a bare PUB socket sending one frame per message to bare SUB sockets: the floor of
any ZeroMQ design in Python) and ``nats`` (core NATS: ``nats-server`` on a free loopback
port, nats-py clients), skipped with the reason when ``nats-server`` or nats-py is missing.
With ``--curve`` also ``meshq-keyed``: the same with a key set from ``meshq.keys`` (the publisher
holds the cluster key, the subscribers the client key ``bench``, granted ``subscribe bench.>`` by
the publisher's node), so every socket is CURVE and pub/sub grants are checked on both sides;
``ratios`` then gives ``meshq-keyed/meshq``, both measured in the same run.
The wildcard part times ``Sublist.match`` on subjects it has not seen (no cache) with 10 and
with 10,000 patterns stored.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from meshq.testing.ports import free_port

SUBJECT = "bench.pubsub.data"
IDLE_S = 3.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime



# ------------------------------------------------------------------ workers (one process each)
def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _wait_go() -> None:
    sys.stdin.readline()


def _report_subscriber(received: int, first: float | None, last: float | None, **extra: Any) -> None:
    _say(role="sub", received=received, first=first, last=last, cpu_s=_cpu_s(), **extra)


def worker_meshq_pub(workdir: str, messages: int, size: int, subscribers: int, keys: str = "") -> None:
    import meshq

    with meshq.Node(cluster="bench-pubsub", data_dir=os.path.join(workdir, "pub"), mdns=False,
                    replication_factor=1, role="storage",
                    keys=os.path.join(keys, "cluster") if keys else None) as node:
        if keys:
            node.acl_grant("bench", "subscribe", "bench.>")
        _say(role="pub", seed=node.address.removeprefix("tcp://"))
        deadline = time.monotonic() + 60
        while len(node.core.pubsub.route(SUBJECT).remote) < subscribers:
            if time.monotonic() > deadline:
                raise SystemExit("the subscribers' interest never arrived")
            time.sleep(0.01)
        _say(role="pub", interest=True)
        _wait_go()
        data = b"x" * size
        cpu = _cpu_s()
        start = time.time()
        publish = node.publish
        for _ in range(messages):
            publish(SUBJECT, data)
        end = time.time()
        _say(role="pub", start=start, end=end, cpu_s=_cpu_s() - cpu)
        time.sleep(IDLE_S + 1)  # stay up while the subscribers drain


def worker_meshq_sub(seed: str, messages: int, keys: str = "") -> None:
    import meshq

    with meshq.Node(cluster="bench-pubsub", role="client", mdns=False, seeds=[seed],
                    keys=os.path.join(keys, "clients", "bench") if keys else None) as node:
        node.wait_ready(30)
        deadline = time.monotonic() + 30
        while True:
            try:
                sub = node.subscribe(SUBJECT, max_pending=1 << 20)
                break
            except meshq.AuthorizationError:  # (keyed: its node has not learnt the grant yet)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        _say(role="sub", ready=True)
        received, first, last = 0, None, None
        while received < messages:
            try:
                sub.recv(timeout=IDLE_S)
            except meshq.TimeoutError:
                break
            received += 1
            if first is None:
                first = time.time()
        last = time.time() if received == messages else (time.time() - IDLE_S if received else None)
        peers = node.core.pubsub.peers
        _report_subscriber(received, first, last, dropped=sub.dropped + sum(p.dropped for p in peers.values()))


def worker_zmq_pub(messages: int, size: int, subscribers: int) -> None:
    import zmq

    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 1_000_000)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    _say(role="pub", seed=f"127.0.0.1:{port}")
    _wait_go()
    data = b"x" * size
    time.sleep(0.5)  # (the coordinator waited for the subscribers' ready lines; their subscriptions travel)
    cpu = _cpu_s()
    start = time.time()
    send = pub.send
    for _ in range(messages):
        send(data)
    end = time.time()
    _say(role="pub", start=start, end=end, cpu_s=_cpu_s() - cpu)
    time.sleep(IDLE_S + 1)
    pub.close()
    context.term()


def worker_zmq_sub(seed: str, messages: int) -> None:
    import zmq

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{seed}")
    _say(role="sub", ready=True)
    received, first = 0, None
    while received < messages:
        if not sub.poll(int(IDLE_S * 1000)):
            break
        sub.recv()
        received += 1
        if first is None:
            first = time.time()
    last = time.time() if received == messages else (time.time() - IDLE_S if received else None)
    _report_subscriber(received, first, last, dropped=messages - received)
    sub.close()
    context.term()


def worker_nats_pub(seed: str, messages: int, size: int, subscribers: int) -> None:
    import asyncio

    import nats

    async def run() -> None:
        nc = await nats.connect(f"nats://{seed}", pending_size=64 * 1024 * 1024)
        _say(role="pub", seed=seed)
        await asyncio.get_running_loop().run_in_executor(None, _wait_go)
        data = b"x" * size
        cpu = _cpu_s()
        start = time.time()
        publish = nc.publish
        for index in range(messages):
            await publish(SUBJECT, data)
            if index % 1000 == 999:
                await asyncio.sleep(0)  # let the client's flusher run (its pending buffer is bounded)
        await nc.flush()
        end = time.time()
        _say(role="pub", start=start, end=end, cpu_s=_cpu_s() - cpu)
        await asyncio.sleep(IDLE_S + 1)
        await nc.close()

    asyncio.run(run())


def worker_nats_sub(seed: str, messages: int) -> None:
    import asyncio

    import nats

    async def run() -> None:
        nc = await nats.connect(f"nats://{seed}")
        state = {"received": 0, "first": None, "heard": time.monotonic()}
        done = asyncio.Event()

        async def on_message(message: Any) -> None:
            state["received"] += 1
            state["heard"] = time.monotonic()
            if state["first"] is None:
                state["first"] = time.time()
            if state["received"] >= messages:
                done.set()

        await nc.subscribe(SUBJECT, cb=on_message, pending_msgs_limit=messages + 1,
                           pending_bytes_limit=1 << 30)
        await nc.flush()
        _say(role="sub", ready=True)
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), 0.2)
            except asyncio.TimeoutError:
                if state["received"] and time.monotonic() - state["heard"] > IDLE_S:
                    break
                if not state["received"] and time.monotonic() - state["heard"] > 60:
                    break
        received = state["received"]
        last = time.time() if received == messages else (time.time() - IDLE_S if received else None)
        _report_subscriber(received, state["first"], last, dropped=messages - received)
        await nc.close()

    asyncio.run(run())


# ------------------------------------------------------------------ the coordinator
def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "meshq.bench.pubsub", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _line(process: subprocess.Popen) -> dict:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {process.args[3:]} exited (code {process.wait()}) without reporting")
    return json.loads(line)


def _round(system: str, subscribers: int, messages: int, size: int, workdir: str, seed: str = "",
           keys: str = "") -> dict:
    processes: list[subprocess.Popen] = []
    keyed = system == "meshq-keyed"
    extra = [keys] if keyed else []
    if keyed:
        system = "meshq"
    try:
        if system == "meshq":
            pub = _spawn("meshq-pub", workdir, str(messages), str(size), str(subscribers), *extra)
        elif system == "pyzmq":
            pub = _spawn("zmq-pub", str(messages), str(size), str(subscribers))
        else:
            pub = None
        if pub is not None:
            processes.append(pub)
            seed = _line(pub)["seed"]
        subs = [_spawn(f"{'zmq' if system == 'pyzmq' else system}-sub", seed, str(messages), *extra)
                for _ in range(subscribers)]
        processes.extend(subs)
        for sub in subs:
            assert _line(sub).get("ready")
        if pub is None:  # nats: the publisher connects once the subscribers are in
            pub = _spawn("nats-pub", seed, str(messages), str(size), str(subscribers))
            processes.append(pub)
            _line(pub)
        if system == "meshq":
            _line(pub)  # the publisher routes to every subscriber
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        published = _line(pub)
        results = [_line(sub) for sub in subs]
        for process in processes:
            process.wait(60)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    rates, cpu_subs = [], 0.0
    for result in results:
        if result["received"] and result["last"] is not None:
            rates.append(result["received"] / max(1e-9, result["last"] - published["start"]))
        else:
            rates.append(0.0)
        cpu_subs += result["cpu_s"]
    wall = max((r["last"] or published["end"]) for r in results) - published["start"]
    return {"per_subscriber_msgs_s": min(rates), "publish_msgs_s": messages / (published["end"] - published["start"]),
            "received": [r["received"] for r in results], "dropped": [r.get("dropped", 0) for r in results],
            "wall_s": wall, "cpu_publisher_s": published["cpu_s"], "cpu_subscribers_s": cpu_subs}


def _summarise(rounds: list[dict]) -> dict:
    rates = [r["per_subscriber_msgs_s"] for r in rounds]
    return {"per_subscriber_msgs_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
            "publish_msgs_s_median": statistics.median(r["publish_msgs_s"] for r in rounds),
            "wall_s_median": statistics.median(r["wall_s"] for r in rounds),
            "cpu_publisher_s_median": statistics.median(r["cpu_publisher_s"] for r in rounds),
            "cpu_subscribers_s_median": statistics.median(r["cpu_subscribers_s"] for r in rounds),
            "rounds": rounds}


def _nats_available() -> str | None:
    """None when NATS core can be measured, else why not."""
    if shutil.which("nats-server") is None:
        return "nats-server is not installed"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install nats-py into this venv to compare)"
    return None


def _wildcard_cost(patterns_small: int = 10, patterns_large: int = 10_000, lookups: int = 20_000) -> dict:
    from meshq.core.pubsub.subjects import Sublist

    out = {}
    for count in (patterns_small, patterns_large):
        table = Sublist()
        for index in range(count):
            kind = index % 4
            pattern = (f"sensors.room{index}.temp", f"sensors.room{index}.*", f"sensors.*.kind{index}",
                       f"logs.app{index}.>")[kind]
            table.insert(pattern, index)
        subjects = [f"sensors.room{i % count}.temp{i}" for i in range(lookups)]  # never seen: no cache hit
        best = float("inf")
        for _ in range(3):
            table._cache = {}
            started = time.perf_counter()
            for subject in subjects:
                table.match(subject)
            best = min(best, time.perf_counter() - started)
        out[str(count)] = {"patterns": count, "us_per_match": best / lookups * 1e6}
    out["ratio_large_to_small"] = out[str(patterns_large)]["us_per_match"] / out[str(patterns_small)]["us_per_match"]
    return out


def run_pubsub_bench(messages: int, size: int, rounds: int, subscriber_counts: tuple[int, ...] = (1, 3),
                     curve: bool = False) -> dict:
    """Measure every system; returns the report (see the module docstring)."""
    report: dict[str, Any] = {"scenario": "pubsub", "messages": messages, "value_bytes": size, "rounds": rounds,
                              "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else "", "results": {}}
    nats_missing = _nats_available()
    report["nats"] = nats_missing or "measured"
    with tempfile.TemporaryDirectory(prefix="meshq-bench-pubsub-") as workdir:
        nats_process = None
        nats_seed = ""
        if nats_missing is None:
            port = free_port()
            nats_process = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nats_seed = f"127.0.0.1:{port}"
            time.sleep(0.5)
        keys = ""
        if curve:
            from meshq.keys import add_client, keygen

            keys = os.path.join(workdir, "keys")
            keygen(keys)
            add_client(keys, "bench")
        try:
            for subscribers in subscriber_counts:
                for system in ("pyzmq", "meshq", "nats") + (("meshq-keyed",) if curve else ()):
                    if system == "nats" and nats_process is None:
                        continue
                    print(f"  {system}: pub -> {subscribers} subscriber(s), {rounds} rounds", file=sys.stderr,
                          flush=True)
                    from meshq.bench.console import _RoundsBar

                    done = []
                    with _RoundsBar(f"{system} -> {subscribers}", rounds) as bar:
                        for r in range(rounds):
                            done.append(_round(system, subscribers, messages, size,
                                               os.path.join(workdir, f"{system}{r}"), nats_seed, keys))
                            bar.advance()
                    report["results"][f"{system}_{subscribers}"] = _summarise(done)
        finally:
            if nats_process is not None:
                nats_process.terminate()
                nats_process.wait(10)
    report["wildcard"] = _wildcard_cost()
    ratios = {}
    for subscribers in subscriber_counts:
        mine = report["results"][f"meshq_{subscribers}"]["per_subscriber_msgs_s"]["median"]
        for other in ("pyzmq", "nats"):
            theirs = report["results"].get(f"{other}_{subscribers}")
            if theirs:
                ratios[f"meshq/{other} ({subscribers} sub)"] = mine / max(1e-9, theirs["per_subscriber_msgs_s"]["median"])
        keyed = report["results"].get(f"meshq-keyed_{subscribers}")
        if keyed:
            rate = keyed["per_subscriber_msgs_s"]
            ratios[f"meshq-keyed/meshq ({subscribers} sub)"] = rate["median"] / max(1e-9, mine)
            report.setdefault("keyed_cost", {})[str(subscribers)] = {
                "median": rate["median"] / max(1e-9, mine),
                "min": rate["min"] / max(1e-9, mine), "max": rate["max"] / max(1e-9, mine),
                "note": "keyed rate (median/min/max over rounds) / unkeyed median rate"}
    report["ratios"] = ratios
    return report


def render(report: dict) -> str:
    lines = [f"meshq bench pubsub: {report['messages']} messages of {report['value_bytes']} bytes, "
             f"{report['rounds']} rounds; NATS core: {report['nats']}",
             f"{'system':<16}{'per subscriber msg/s (median [min-max])':<44}{'publish msg/s':>14}"
             f"{'cpu pub s':>11}{'cpu subs s':>12}{'wall s':>8}"]
    for name, result in report["results"].items():
        rate = result["per_subscriber_msgs_s"]
        lines.append(f"{name:<16}{rate['median']:>12,.0f} [{rate['min']:,.0f}-{rate['max']:,.0f}]"
                     f"{'':<12}{result['publish_msgs_s_median']:>14,.0f}{result['cpu_publisher_s_median']:>11.2f}"
                     f"{result['cpu_subscribers_s_median']:>12.2f}{result['wall_s_median']:>8.2f}")
    for name, ratio in report["ratios"].items():
        lines.append(f"ratio {name}: {ratio:.2f}x")
    for subscribers, cost in report.get("keyed_cost", {}).items():
        lines.append(f"keyed/unkeyed ({subscribers} sub): median {cost['median']:.2f}x "
                     f"[min {cost['min']:.2f}x - max {cost['max']:.2f}x of the keyed rounds vs the unkeyed median]")
    wildcard = report["wildcard"]
    small, large = (wildcard[k] for k in list(wildcard)[:2])
    lines.append(f"wildcard match: {small['us_per_match']:.2f} us with {small['patterns']} patterns, "
                 f"{large['us_per_match']:.2f} us with {large['patterns']} ({wildcard['ratio_large_to_small']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    role, *rest = argv
    workers = {"meshq-pub": lambda: worker_meshq_pub(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), *rest[4:]),
               "meshq-sub": lambda: worker_meshq_sub(rest[0], int(rest[1]), *rest[2:]),
               "zmq-pub": lambda: worker_zmq_pub(int(rest[0]), int(rest[1]), int(rest[2])),
               "zmq-sub": lambda: worker_zmq_sub(rest[0], int(rest[1])),
               "nats-pub": lambda: worker_nats_pub(rest[0], int(rest[1]), int(rest[2]), int(rest[3])),
               "nats-sub": lambda: worker_nats_sub(rest[0], int(rest[1]))}
    workers[role]()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
