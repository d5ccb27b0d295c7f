"""Membership benchmark: how fast local `meshq node` processes agree on the mesh, and find a crash.

    python benchmarks/membership.py                 # --repeat 3, text table
    python benchmarks/membership.py --repeat 3 --json

What is measured (see benchmarks/results/membership.md for a run)
-----------------------------------------------------------------
For N = 3 and N = 10 storage nodes, each discovery mode:

* ``mdns``: all N processes launched back to back (one ``Popen`` after the other, no
  waiting), mDNS pinned to 127.0.0.1 (``--interface 127.0.0.1``), no seeds.
* ``seed``: the first node launched alone (``--no-mdns``) and waited for until it has formed
  its one-member cluster; then the other N-1 launched back to back with ``--seed first``.

t0 is the moment the last ``Popen`` returned. Every node is observed *individually*: the
benchmark sends the wire-protocol ``status`` request (the one ``Node.status()`` fans out to
every storage node) to one node at a time from a plain ZeroMQ DEALER, so the answer is
exactly that node's ``local_status()``, not a merge. The probe's sender id is unknown to the
nodes, so it does not touch their member tables. Rounds of probes run every
``--poll-interval`` seconds (default 0.02), which bounds the timing resolution.

* ``ready``: t0 -> the last ``{"event": "ready"}`` line (interpreter start-up, imports,
  storage, sockets). Also reported from the first launch.
* ``agreed``: t0 -> the first probe round in which every node reports
  ``metadata.voters`` == the N node ids and ``metadata.commit_index >= metadata.last_index``
  (the agreed, Raft-committed storage membership).
* ``alive``: t0 -> the first round in which every node's own ``members`` list shows all N
  storage nodes ``alive`` (the heartbeat view).
* ``converged``: t0 -> the first round in which both hold on every node.

Failure detection: on the converged mesh, one follower (not the metadata leader; the last
launched such node) is killed with SIGKILL. From the moment ``os.kill`` returned, every
survivor is probed until its own ``members`` entry for the victim says ``dead``; reported per
survivor and as the max over survivors.

Only processes this script starts are signalled, by PID; every socket is on 127.0.0.1; the
temporary data directories are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import zmq

from meshq.core import wire

MESHQ = [sys.executable, "-m", "meshq"]
TARGETS_S = {("converge", 3): 2.0, ("converge", 10): 5.0, ("detect", 3): 4.0, ("detect", 10): 4.0}
PROBE_ID = "membership-bench-probe"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- processes
class Proc:
    """One `meshq node` child, launched without waiting; the ready line is read by a thread."""

    def __init__(self, root: str, index: int, cluster: str, mdns: bool, seeds: list[str]) -> None:
        self.data_dir = os.path.join(root, f"n{index}")
        self.log_path = os.path.join(root, f"n{index}.log")
        self.port = free_port()
        self.command = [*MESHQ, "node", "--data", self.data_dir, "--host", "127.0.0.1", "--port", str(self.port),
                        "--cluster", cluster]
        self.command += ["--interface", "127.0.0.1"] if mdns else ["--no-mdns"]
        for seed in seeds:
            self.command += ["--seed", seed]
        self.process: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}
        self.ready_at: float | None = None
        self.launched_at = 0.0
        self._log: Any = None
        self._reader: threading.Thread | None = None

    @property
    def seed(self) -> str:
        return f"127.0.0.1:{self.port}"

    def launch(self) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._log,
                                        stdin=subprocess.DEVNULL)
        self.launched_at = time.monotonic()
        self._reader = threading.Thread(target=self._read_ready, daemon=True)
        self._reader.start()

    def _read_ready(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        now = time.monotonic()
        if line.startswith(b"{"):
            self.ready = json.loads(line)
            self.ready_at = now

    def wait_ready(self, deadline: float) -> None:
        assert self._reader is not None
        self._reader.join(max(0.0, deadline - time.monotonic()))
        if self.ready_at is None:
            raise RuntimeError(f"node {self.seed} did not print its ready line; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)

    def terminate(self) -> None:
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGTERM)

    def reap(self, timeout_s: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._reader is not None:
            self._reader.join(1.0)
        if self._log is not None:
            self._log.close()


def stop_all(procs: list[Proc]) -> None:
    """SIGTERM every process this script started (by PID), then reap; SIGKILL after 5 s."""
    for proc in procs:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.reap(5.0)


# ---------------------------------------------------------------------- per-node views
class Probe:
    """Asks each node for its own status over the wire protocol (one DEALER per node)."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.request_id = 0

    def add(self, node_id: str, address: str) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        self.sockets[node_id] = sock

    def remove(self, node_id: str) -> None:
        sock = self.sockets.pop(node_id, None)
        if sock is not None:
            sock.close(0)

    def round(self, node_ids: list[str], timeout_s: float = 1.0) -> dict[str, dict]:
        """One request to each node; returns node_id -> its local status (missing if no answer in time)."""
        expected: dict[int, str] = {}
        for node_id in node_ids:
            self.request_id += 1
            expected[self.request_id] = node_id
            self.sockets[node_id].send_multipart(wire.encode(self.cluster, PROBE_ID, "status", self.request_id, {}))
        poller = zmq.Poller()
        for node_id in node_ids:
            poller.register(self.sockets[node_id], zmq.POLLIN)
        views: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(views) < len(node_ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for sock, _ in poller.poll(remaining * 1000):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    message = wire.decode(frames, self.cluster)
                    node_id = expected.get(message.request_id)
                    if node_id is not None and message.type == "status_ok":
                        views[node_id] = message.body["status"]
        return views

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.context.term()


def agreed(view: dict, ids: set[str]) -> bool:
    meta = view.get("metadata") or {}
    return set(meta.get("voters", ())) == ids and meta.get("commit_index", -1) >= meta.get("last_index", 0)


def all_alive(view: dict, ids: set[str]) -> bool:
    alive = {m["node_id"] for m in view["members"] if m["role"] == "storage" and m["state"] == "alive"}
    return ids <= alive


def member_state(view: dict, node_id: str) -> str | None:
    return next((m["state"] for m in view["members"] if m["node_id"] == node_id), None)


# ---------------------------------------------------------------------- one scenario
def run_scenario(n: int, mode: str, args: argparse.Namespace, public_check: bool = False) -> dict:
    cluster = f"mbench-{uuid.uuid4().hex[:10]}"
    root = tempfile.mkdtemp(prefix="meshq-membership-")
    procs: list[Proc] = []
    probe = Probe(cluster)
    result: dict[str, Any] = {"n": n, "mode": mode}
    try:
        first_formed_s = None
        if mode == "seed":
            first = Proc(root, 0, cluster, mdns=False, seeds=[])
            procs.append(first)
            first.launch()
            first.wait_ready(time.monotonic() + 20)
            probe.add(first.ready["node_id"], first.ready["address"])
            me = {first.ready["node_id"]}
            deadline = time.monotonic() + 10
            while True:
                view = probe.round(list(me)).get(first.ready["node_id"])
                if view is not None and agreed(view, me):
                    first_formed_s = time.monotonic() - first.launched_at
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the seed node never formed its cluster; log:\n{first.log_tail()}")
                time.sleep(args.poll_interval)
            batch = [Proc(root, i, cluster, mdns=False, seeds=[first.seed]) for i in range(1, n)]
        else:
            batch = [Proc(root, i, cluster, mdns=True, seeds=[]) for i in range(n)]
        procs.extend(batch)
        for proc in batch:  # back to back: nothing between the launches
            proc.launch()
        t0 = time.monotonic()
        first_launch = batch[0].launched_at
        deadline = t0 + args.timeout
        for proc in batch:
            proc.wait_ready(deadline)
            probe.add(proc.ready["node_id"], proc.ready["address"])
        last_ready = max(p.ready_at for p in batch if p.ready_at is not None)
        result["launch_span_s"] = t0 - batch[0].launched_at
        result["ready_s"] = last_ready - t0
        result["ready_from_first_launch_s"] = last_ready - first_launch
        result["node_ready_s"] = [p.ready_at - t0 for p in batch if p.ready_at is not None]
        if first_formed_s is not None:
            result["seed_formed_s"] = first_formed_s

        ids = {p.ready["node_id"] for p in procs}
        order = [p.ready["node_id"] for p in procs]
        node_agreed: dict[str, float] = {}
        node_alive: dict[str, float] = {}
        times: dict[str, float | None] = {"agreed": None, "alive": None, "converged": None}
        views: dict[str, dict] = {}
        while time.monotonic() < deadline:
            views = probe.round(order)
            now = time.monotonic() - t0
            for node_id, view in views.items():
                if agreed(view, ids):
                    node_agreed.setdefault(node_id, now)
                if all_alive(view, ids):
                    node_alive.setdefault(node_id, now)
            every_agreed = len(views) == n and all(agreed(v, ids) for v in views.values())
            every_alive = len(views) == n and all(all_alive(v, ids) for v in views.values())
            if every_agreed and times["agreed"] is None:
                times["agreed"] = now
            if every_alive and times["alive"] is None:
                times["alive"] = now
            if every_agreed and every_alive:
                times["converged"] = now
                break
            time.sleep(args.poll_interval)
        result.update({f"{k}_s": v for k, v in times.items()})
        result["node_agreed_s"] = [node_agreed.get(i) for i in order]
        result["node_alive_s"] = [node_alive.get(i) for i in order]
        if times["converged"] is None:
            result["error"] = "not converged within --timeout"
            result["last_views"] = {i: views.get(i, {}).get("metadata") for i in order}
            return result
        leaders = {v["metadata"]["leader"] for v in views.values()}
        result["leader"] = leaders.pop() if len(leaders) == 1 else sorted(leaders)
        result["leader_is_first_launched"] = result["leader"] == order[0]
        result["commit_index"] = max(v["metadata"]["commit_index"] for v in views.values())

        if public_check and n == 3 and mode == "seed":
            result["public_check"] = public_api_check(cluster, procs[1].seed, procs[1].ready["node_id"])

        # ---------------------------------------------------------- failure detection
        leader = result["leader"]
        victim = next(p for p in reversed(procs) if p.ready["node_id"] != leader)
        victim_id = victim.ready["node_id"]
        survivors = [i for i in order if i != victim_id]
        victim.kill()
        t_kill = time.monotonic()
        probe.remove(victim_id)
        victim.reap(5.0)
        suspect: dict[str, float] = {}
        dead: dict[str, float] = {}
        kill_deadline = t_kill + args.detect_timeout
        while time.monotonic() < kill_deadline and len(dead) < len(survivors):
            pending = [i for i in survivors if i not in dead]
            views = probe.round(pending)
            now = time.monotonic() - t_kill
            for node_id, view in views.items():
                state = member_state(view, victim_id)
                if state in ("suspect", "dead"):
                    suspect.setdefault(node_id, now)
                if state == "dead":
                    dead[node_id] = now
            time.sleep(args.poll_interval)
        result["victim"] = victim_id
        result["detect_per_survivor_s"] = [dead.get(i) for i in survivors]
        result["suspect_per_survivor_s"] = [suspect.get(i) for i in survivors]
        result["detect_s"] = max(dead.values()) if len(dead) == len(survivors) else None
        if result["detect_s"] is None:
            result["error"] = f"{len(survivors) - len(dead)} survivors never marked the victim dead"
        return result
    except Exception as exc:  # reported in the results; the run goes on
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        probe.close()
        stop_all(procs)
        if args.keep_logs:
            print(f"N={n} {mode}: logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def public_api_check(cluster: str, seed: str, seed_id: str) -> dict:
    """Does a public-API client pinned to one node (seeds=[it], no mDNS) see only that node's view?"""
    from meshq.node import Node

    client = Node(cluster=cluster, seeds=[seed], mdns=False, role="client").start()
    try:
        started = time.monotonic()
        client.wait_ready(10)
        status = client.status(timeout=5)
        return {"pinned_to": seed_id, "answered_by": status.get("answered_by"),
                "view_of": status.get("node_id"), "seconds": round(time.monotonic() - started, 3)}
    finally:
        client.stop()


# ---------------------------------------------------------------------- reporting
def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for n in (3, 10):
        for mode in ("mdns", "seed"):
            runs = [r for r in results if r["n"] == n and r["mode"] == mode]
            if not runs:
                continue
            row: dict[str, Any] = {"n": n, "mode": mode, "runs": len(runs),
                                   "errors": [r["error"] for r in runs if r.get("error")]}
            for key in ("ready_s", "ready_from_first_launch_s", "agreed_s", "alive_s", "converged_s", "detect_s",
                        "seed_formed_s"):
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    row[key] = {"median": statistics.median(values), "max": max(values), "n": len(values)}
            per = [t for r in runs for t in r.get("detect_per_survivor_s", []) if t is not None]
            if per:
                row["detect_per_survivor"] = {"min": min(per), "median": statistics.median(per), "max": max(per),
                                              "n": len(per)}
            conv = row.get("converged_s")
            if conv:
                row["converge_target_s"] = TARGETS_S[("converge", n)]
                row["converge_target_met"] = conv["max"] <= TARGETS_S[("converge", n)] and conv["n"] == len(runs)
            det = row.get("detect_s")
            if det:
                row["detect_target_s"] = TARGETS_S[("detect", n)]
                row["detect_target_met"] = det["max"] <= TARGETS_S[("detect", n)] and det["n"] == len(runs)
            rows.append(row)
    return rows


def fmt(stat: dict | None) -> str:
    if not stat:
        return "—"
    return f"{stat['median']:.2f} / {stat['max']:.2f}"


def print_table(rows: list[dict]) -> None:
    print("figures: median / max over repeats, seconds")
    header = ["N", "discovery", "ready", "agreed", "alive", "converged", "target", "detect (max surv.)", "target"]
    print(" | ".join(header))
    for row in rows:
        conv_ok = "met" if row.get("converge_target_met") else "MISSED"
        det_ok = "met" if row.get("detect_target_met") else "MISSED"
        print(" | ".join([
            str(row["n"]), row["mode"], fmt(row.get("ready_s")), fmt(row.get("agreed_s")), fmt(row.get("alive_s")),
            fmt(row.get("converged_s")), f"≤{row.get('converge_target_s', '?')} {conv_ok}",
            fmt(row.get("detect_s")), f"≤{row.get('detect_target_s', '?')} {det_ok}",
        ]))
        if row.get("errors"):
            print(f"   errors: {row['errors']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of every scenario (default 3)")
    parser.add_argument("--sizes", default="3,10", help="mesh sizes, comma-separated (default 3,10)")
    parser.add_argument("--modes", default="mdns,seed", help="discovery modes (default mdns,seed)")
    parser.add_argument("--poll-interval", type=float, default=0.02, help="seconds between probe rounds")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds allowed to converge")
    parser.add_argument("--detect-timeout", type=float, default=10.0, help="seconds allowed to detect the kill")
    parser.add_argument("--no-public-check", dest="public_check", action="store_false",
                        help="skip the pinned public-API client check (3-node seed mesh, first repeat)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the node logs (their directory is printed)")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
               "platform": platform.platform(), "loadavg_before": os.getloadavg()}
    started = time.monotonic()
    results = []
    for repeat in range(args.repeat):
        for n in sizes:
            for mode in modes:
                result = run_scenario(n, mode, args, public_check=args.public_check and repeat == 0)
                result["repeat"] = repeat
                results.append(result)
                if not args.json:
                    brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                             if k.endswith("_s") or k in ("error", "public_check")}
                    print(f"[{repeat}] N={n} {mode}: {brief}", file=sys.stderr, flush=True)
    machine["loadavg_after"] = os.getloadavg()
    machine["wall_s"] = time.monotonic() - started
    rows = summarize(results)
    if args.json:
        print(json.dumps({"machine": machine, "command": " ".join(["python", *sys.argv]), "summary": rows,
                          "runs": results}, indent=2))
    else:
        print(f"machine: {machine}")
        print_table(rows)
    return 0 if not any(r.get("error") for r in results) else 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
