"""The peers of ``meshq bench queue``, measured in the same run: RabbitMQ (quorum queue) and Redis streams.

Theory of operation
-------------------
Each peer's server is started once per run on 127.0.0.1 (free ports, a temporary directory
under the run's workdir) when its binary is on the PATH and its Python client imports
(``pika`` / ``redis``; benchmark-only, not package dependencies); otherwise the report says
"not installed: not measured". RabbitMQ runs with its own ``epmd`` bound to 127.0.0.1, the
server script run directly (as /work/shared/peers/README.md describes); Redis with
``--appendonly yes --appendfsync everysec``. Every process is stopped by the PID this module
started (epmd too), also on failure.

A round (called right after meshq's round, so the systems alternate): a fresh queue /
stream is preloaded with ``--jobs`` records of ``--value-bytes`` (RabbitMQ: persistent
messages with publisher confirms, at most ``CONFIRM_WINDOW`` unconfirmed in flight; Redis:
XADD pipelined ``--batch`` at a time), untimed. Then ``--workers`` worker processes (this
module's ``main``) are told ``go`` together and ack every record individually (RabbitMQ:
``basic_ack`` per delivery, ``multiple=False``, prefetch 2000 like meshq's workers; Redis:
XREADGROUP of up to 1000 then one XACK command per record, pipelined). Each worker reports
its acked count on stdout every ~20 ms; the clock stops when the counts add up to
``--jobs``. CPU is user + system of the server (and its child processes) and the workers,
from /proc, per record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from meshq.bench.cpu import _CpuSampler
from meshq.bench.errors import BenchError
from meshq.testing.ports import free_port

PEERS = (("rabbitmq_quorum_queue", "rabbitmq-server", "pika"), ("redis_streams", "redis-server", "redis"))
CONFIRM_WINDOW = 1000
PREFETCH = 2000
START_TIMEOUT_S = 60.0
ROUND_TIMEOUT_S = 600.0
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def _missing(server: str, module: str) -> str | None:
    """Why a peer cannot run here, or None."""
    if shutil.which(server) is None:
        return f"{server} is not installed: not measured"
    try:
        __import__(module)
    except ImportError:
        return f"the Python client {module!r} is not installed: not measured"
    return None


def _wait_port(port: int, proc: subprocess.Popen, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as exc:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with code {proc.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not listen on port {port} within {timeout_s:.0f} s: {exc}") from None
            time.sleep(0.1)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def _stop(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """SIGTERM by PID, then SIGKILL; reaps it."""
    if proc is None:
        return
    try:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
    except ProcessLookupError:
        pass


class _Peer:
    name = ""
    kind = ""

    def __init__(self, workdir: str) -> None:
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()

    def _spawn(self, argv: list[str], label: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(os.path.join(self.dir, f"{label}.out"), "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.dir)
        self.procs.append(proc)
        return proc

    def server_pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        for proc in self.procs:
            for pid in _descendants(proc.pid):
                pids[f"{self.kind}-{pid}"] = pid
        return pids

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)

    def round(self, args: Any, number: int) -> dict[str, Any]:
        queue = f"bench-{uuid.uuid4().hex[:8]}-{number}"
        t0 = time.perf_counter()
        self.preload(queue, args.jobs, args.value_bytes, args.batch)
        preload_s = time.perf_counter() - t0
        result = _consume(self, args, queue)
        result["preload_records_per_s"] = round(args.jobs / preload_s)
        self.cleanup(queue)
        return result

    def preload(self, queue: str, jobs: int, value_bytes: int, batch: int) -> None:
        raise NotImplementedError

    def cleanup(self, queue: str) -> None:
        raise NotImplementedError


class _Redis(_Peer):
    name, kind = "redis_streams", "redis"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        try:
            proc = self._spawn([shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port",
                                str(self.port), "--protected-mode", "yes", "--appendonly", "yes", "--appendfsync",
                                "everysec", "--save", "", "--dir", self.dir, "--daemonize", "no"], "redis-server")
            _wait_port(self.port, proc, "redis-server")
        except BaseException:
            self.stop()
            raise

    def _client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def preload(self, queue: str, jobs: int, value_bytes: int, batch: int) -> None:
        r = self._client()
        r.xgroup_create(queue, "workers", id="0", mkstream=True)
        value = b"x" * value_bytes
        for start in range(0, jobs, batch):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(batch, jobs - start)):
                pipe.xadd(queue, {"v": value})
            pipe.execute()
        r.close()

    def cleanup(self, queue: str) -> None:
        r = self._client()
        r.delete(queue)
        r.close()


class _RabbitMQ(_Peer):
    name, kind = "rabbitmq_quorum_queue", "rabbitmq"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        try:
            epmd_port, dist_port = free_port(), free_port()
            epmd = self._spawn([shutil.which("epmd") or "epmd", "-address", "127.0.0.1", "-port", str(epmd_port)],
                               "epmd", env={**os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1"})
            _wait_port(epmd_port, epmd, "epmd")
            with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
                f.write(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
            with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
                f.write("[].\n")
            os.makedirs(os.path.join(self.dir, "home"), exist_ok=True)
            env = {**os.environ, "HOME": os.path.join(self.dir, "home"), "ERL_EPMD_ADDRESS": "127.0.0.1",
                   "ERL_EPMD_PORT": str(epmd_port), "RABBITMQ_NODENAME": f"bench{self.port}@localhost",
                   "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
                   "RABBITMQ_DIST_PORT": str(dist_port),
                   "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq.conf"),
                   "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
                   "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
                   "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
                   "RABBITMQ_PID_FILE": os.path.join(self.dir, "rabbit.pid"),
                   "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}
            server = RABBITMQ_SERVER if os.path.exists(RABBITMQ_SERVER) else shutil.which("rabbitmq-server")
            proc = self._spawn([server or "rabbitmq-server"], "rabbitmq-server", env=env)
            _wait_port(self.port, proc, "rabbitmq-server", 120.0)
        except BaseException:
            self.stop()
            raise

    def _connect(self) -> Any:
        import pika

        return pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1", port=self.port,
                                                                 heartbeat=0, blocked_connection_timeout=120))

    def preload(self, queue: str, jobs: int, value_bytes: int, batch: int) -> None:
        import pika

        connection = self._connect()
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        impl = channel._impl  # the non-blocking channel: confirms by callback, so many can be in flight
        state = {"confirmed": 0, "nacked": 0}

        def on_confirm(frame: Any) -> None:
            method = frame.method
            tag = method.delivery_tag
            count = tag - state["confirmed"] if method.multiple else 1
            state["confirmed"] = max(state["confirmed"], tag) if method.multiple else state["confirmed"] + 1
            if type(method).__name__ == "Nack":
                state["nacked"] += count

        impl.confirm_delivery(on_confirm)
        connection.process_data_events(time_limit=0)
        properties = pika.BasicProperties(delivery_mode=2)
        value = b"x" * value_bytes
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        for sent in range(1, jobs + 1):
            impl.basic_publish("", queue, value, properties)
            while sent - state["confirmed"] >= CONFIRM_WINDOW:
                connection.process_data_events(time_limit=0.01)
        while state["confirmed"] < jobs:
            if time.monotonic() > deadline:
                raise BenchError(f"RabbitMQ confirmed only {state['confirmed']} of {jobs} publishes")
            connection.process_data_events(time_limit=0.01)
        connection.close()
        if state["nacked"]:
            raise BenchError(f"RabbitMQ nacked {state['nacked']} publishes")

    def cleanup(self, queue: str) -> None:
        connection = self._connect()
        connection.channel().queue_delete(queue)
        connection.close()


def _consume(peer: _Peer, args: Any, queue: str) -> dict[str, Any]:
    workers: list[subprocess.Popen] = []
    counts = [0] * args.workers
    try:
        for i in range(args.workers):
            argv = [sys.executable, "-m", "meshq.bench.queue_peers", peer.kind, "--port", str(peer.port),
                    "--queue", queue, "--name", f"w{i + 1}"]
            with open(os.path.join(peer.dir, f"{queue}-worker{i + 1}.stderr"), "wb") as stderr:
                workers.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                                text=True))
        for worker in workers:
            line = worker.stdout.readline()
            if '"ready"' not in line:
                raise BenchError(f"a {peer.kind} worker did not start: {line!r}")

        def follow(i: int, worker: subprocess.Popen) -> None:
            for line in worker.stdout:
                try:
                    counts[i] = json.loads(line)["acked"]
                except (ValueError, KeyError):
                    pass

        readers = [threading.Thread(target=follow, args=(i, w), daemon=True) for i, w in enumerate(workers)]
        for reader in readers:
            reader.start()
        sampler = _CpuSampler({**peer.server_pids(), **{f"worker{i + 1}": w.pid for i, w in enumerate(workers)}})
        sampler.start()
        t0 = time.perf_counter()
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while sum(counts) < args.jobs:
            if time.monotonic() > deadline or all(w.poll() is not None for w in workers):
                raise BenchError(f"{peer.kind}: only {sum(counts)} of {args.jobs} records acked")
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        sampler.stop()
        acked = sum(counts)
        for worker in workers:
            worker.stdin.write("stop\n")
            worker.stdin.flush()
        for worker in workers:
            worker.wait(60)
        for reader in readers:
            reader.join(10)
        cpu = sum(seconds for _name, seconds in sampler.cpu.values())
        return {"acked": acked, "per_worker": list(counts), "wall_s": round(wall, 3),
                "acked_per_s": round(acked / wall), "cpu_us_per_record": round(1e6 * cpu / acked, 1),
                "cpu": sampler.summary()}
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)


def start_peers(workdir: str) -> tuple[dict[str, _Peer], dict[str, Any]]:
    """The peers that run here, and a report entry for each (a note when one is not measured)."""
    running: dict[str, _Peer] = {}
    notes: dict[str, Any] = {}
    for (name, server, module), cls in zip(PEERS, (_RabbitMQ, _Redis)):
        why = _missing(server, module)
        if why is not None:
            notes[name] = why
            continue
        try:
            running[name] = cls(workdir)
            notes[name] = {"rounds": []}
        except Exception as exc:  # the constructor stopped what it started; meshq's run goes on
            notes[name] = f"{server} did not start ({type(exc).__name__}: {exc}): not measured"
    return running, notes


# ---- worker processes -------------------------------------------------------------------------------------------


def _report(acked: int, last: list[float], force: bool = False) -> None:
    now = time.monotonic()
    if force or now - last[0] >= 0.02:
        last[0] = now
        print(json.dumps({"acked": acked}), flush=True)


def _worker_rabbitmq(args: argparse.Namespace, go: threading.Event, stop: threading.Event) -> None:
    import pika

    connection = pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1", port=args.port, heartbeat=0))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=PREFETCH)
    acked = [0]
    last = [0.0]

    def on_message(ch: Any, method: Any, _properties: Any, _body: bytes) -> None:
        ch.basic_ack(method.delivery_tag, multiple=False)
        acked[0] += 1

    print(json.dumps({"event": "ready"}), flush=True)
    go.wait()
    channel.basic_consume(args.queue, on_message, auto_ack=False)
    while not stop.is_set():
        connection.process_data_events(time_limit=0.02)
        _report(acked[0], last)
    _report(acked[0], last, force=True)
    connection.close()


def _worker_redis(args: argparse.Namespace, go: threading.Event, stop: threading.Event) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=args.port)
    acked = 0
    last = [0.0]
    print(json.dumps({"event": "ready"}), flush=True)
    go.wait()
    while not stop.is_set():
        reply = r.xreadgroup("workers", args.name, {args.queue: ">"}, count=1000, block=100)
        for _stream, entries in reply or ():
            pipe = r.pipeline(transaction=False)
            for entry_id, _fields in entries:
                pipe.xack(args.queue, "workers", entry_id)
            acked += sum(pipe.execute())
        _report(acked, last)
    _report(acked, last, force=True)
    r.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("rabbitmq", "redis"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    go, stop = threading.Event(), threading.Event()

    def read_commands() -> None:
        for line in sys.stdin:
            (go if line.strip() == "go" else stop).set()
        go.set()
        stop.set()

    threading.Thread(target=read_commands, daemon=True).start()
    (_worker_rabbitmq if args.kind == "rabbitmq" else _worker_redis)(args, go, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
