"""How long a storage node outside a partition's replica set keeps naming a leader that stepped down.

    python benchmarks/stale_leader_hint.py --baseline /tmp/base --rounds 3

Four local `meshq node` processes (127.0.0.1, seeds, no mDNS), a topic with one partition and
replication factor 3, so one node (the outsider) holds no replica. Once every node names the same
leader and its three replicas are in sync, both followers are SIGSTOPped: the leader's lease runs
out in a minority and it steps down (its own ``status`` no longer names itself). From that moment
the outsider's own view (the wire ``status`` request to it alone, ``tests.multinode.probe``) is
polled every 50 ms until it stops naming the old leader, for at most ``--window`` seconds; then the
followers are resumed and every process is killed by PID.

``--baseline DIR``: a tree whose ``meshq`` package is the version to compare against (for example
``git archive <commit> meshq | tar -x -C DIR``); its nodes run with ``PYTHONPATH=DIR``. Rounds
alternate between this tree and the baseline. Prints each round and the median, min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.multinode.helpers import partitions_of, view  # noqa: E402
from tests.procs import NodeProcess, run_cli  # noqa: E402


def leader_in(node: NodeProcess, topic: str) -> str | None:
    status = view(node, 1.0)
    part = partitions_of(status, topic).get(0) if status is not None else None
    return "?" if part is None else part["leader"]


def one_round(label: str, window_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        first = NodeProcess(os.path.join(tmp, "n0"), cluster=f"hint{os.getpid()}{label}").start()
        nodes = [first]
        try:
            for k in range(1, 4):
                nodes.append(NodeProcess(os.path.join(tmp, f"n{k}"), cluster=first.cluster,
                                         extra=["--seed", first.seed]).start())
            by_id = {n.ready["node_id"]: n for n in nodes}
            run_cli("topics", "create", "h", "--partitions", "1", "--replication-factor", "3", "--cluster",
                    first.cluster, "--seed", first.seed, "--no-mdns", timeout_s=60)
            deadline = time.monotonic() + 60
            while True:
                parts = {nid: partitions_of(s, "h").get(0) for nid, n in by_id.items() if (s := view(n, 1.0))}
                leaders = {p["leader"] for p in parts.values() if p}
                if len(parts) == 4 and all(parts.values()) and len(leaders) == 1 and None not in leaders:
                    leader = next(iter(leaders))
                    if len(parts[leader]["replicas"]) == 3 and len(parts[leader].get("in_sync") or []) == 3:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the partition did not settle within 60 s: {parts}")
                time.sleep(0.2)
            replicas = parts[leader]["replicas"]
            outsider = next(nid for nid in sorted(by_id) if nid not in replicas)
            followers = [nid for nid in replicas if nid != leader]
            for nid in followers:
                by_id[nid].pause()
            paused = time.monotonic()
            while leader_in(by_id[leader], "h") == leader:
                if time.monotonic() - paused > 30:
                    raise RuntimeError("the leader did not step down within 30 s")
                time.sleep(0.05)
            stepped = time.monotonic()
            stale_s = None
            while time.monotonic() - stepped < window_s:
                if leader_in(by_id[outsider], "h") != leader:
                    stale_s = time.monotonic() - stepped
                    break
                time.sleep(0.05)
            return {"tree": label, "step_down_s": round(stepped - paused, 2),
                    "outsider_stale_s": round(stale_s, 2) if stale_s is not None else None}
        finally:
            for node in nodes:
                node.resume()
                node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, metavar="DIR", help="a tree holding the meshq to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=12.0, metavar="S", help="bound on the stale time measured")
    args = parser.parse_args()
    trees = [("this", REPO)] + ([("baseline", os.path.abspath(args.baseline))] if args.baseline else [])
    results: dict[str, list] = {label: [] for label, _ in trees}
    for _ in range(args.rounds):
        for label, tree in trees:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, REPO]))
            out = subprocess.run([sys.executable, __file__, "--one", label, str(args.window)], env=env, cwd=tempfile.gettempdir(),
                                 capture_output=True, text=True, timeout=300)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            results[label].append(row["outsider_stale_s"])
    for label, values in results.items():
        if any(v is None for v in values):
            print(f"{label}: the outsider named the old leader for more than {args.window} s in "
                  f"{sum(v is None for v in values)} of {len(values)} rounds")
        else:
            print(f"{label}: outsider named the old leader for median {statistics.median(values):.2f} s "
                  f"(min {min(values):.2f}, max {max(values):.2f}) after it stepped down")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one_round(sys.argv[2], float(sys.argv[3]))))
    else:
        main()
