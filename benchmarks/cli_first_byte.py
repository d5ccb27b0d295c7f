"""How long a CLI command takes, with mDNS alone, from its start to the first request byte it sends.

    python benchmarks/cli_first_byte.py                # 5 runs of `meshq status` against 3 mDNS nodes
    python benchmarks/cli_first_byte.py --runs 9 --json

Three `meshq node` processes are started on 127.0.0.1 with mDNS pinned to loopback (a unique
cluster, a temporary directory), and waited for until `meshq status` lists them. Then each
run is ``meshq status --cluster C --interface 127.0.0.1 --json`` (no --seed) under
``strace -f --seccomp-bpf -ttt -e trace=execve,sendto``: t0 is the ``execve`` of the
command, the end is the first ``sendto`` whose bytes hold the ``hello`` request (the first
request of a client; what precedes it on the wire is ZeroMQ's connection handshake).
strace only stops the command at those two system calls, so it adds little; the figures
are, if anything, pessimistic. The whole command's wall time is reported too. Every node
is stopped by PID at the end, pass or fail, and the directory removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

MESHQ = [sys.executable, "-m", "meshq"]
_LINE = re.compile(r"^\d+\s+(\d+\.\d+)\s+(\w+)\((.*)$")


def first_hello_s(trace_path: str) -> float | None:
    """Seconds from the traced command's execve to its first sendto carrying a hello request."""
    start = None
    with open(trace_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = _LINE.match(line)
            if match is None:
                continue
            at, call, rest = float(match.group(1)), match.group(2), match.group(3)
            if call == "execve" and start is None:
                start = at
            elif call == "sendto" and "hello" in rest and start is not None:
                return at - start
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        print("cli_first_byte: needs strace (apt-get install strace)", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="meshq-first-byte-")
    cluster = f"fb-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in ("MESHQ_SEEDS", "MESHQ_INTERFACES", "MESHQ_CLUSTER")}
    nodes: list[subprocess.Popen] = []
    try:
        for i in range(3):
            log = open(os.path.join(root, f"n{i}.log"), "wb")
            nodes.append(subprocess.Popen([*MESHQ, "node", "--data", os.path.join(root, f"n{i}"), "--port", "0",
                                           "--interface", "127.0.0.1", "--cluster", cluster],
                                          stdout=subprocess.PIPE, stderr=log, env=env))
        for node in nodes:
            assert node.stdout is not None and node.stdout.readline().startswith(b"{"), "a node did not start"
        command = [*MESHQ, "status", "--cluster", cluster, "--interface", "127.0.0.1", "--json"]
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(command, capture_output=True, env=env, timeout=60)
            if result.returncode == 0 and sum(m["role"] == "storage" and m["state"] == "alive"
                                              for m in json.loads(result.stdout)["members"]) == 3:
                break
            if time.monotonic() > deadline:
                print(f"cli_first_byte: the 3 nodes did not all show up: {result.stderr.decode()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        first_bytes, walls = [], []
        for run in range(args.runs):
            trace = os.path.join(root, f"trace-{run}.txt")
            started = time.monotonic()
            result = subprocess.run(["strace", "-f", "--seccomp-bpf", "-ttt", "-s", "256", "-e",
                                     "trace=execve,sendto", "-o", trace, *command], capture_output=True, env=env,
                                    timeout=60)
            walls.append(time.monotonic() - started)
            seconds = first_hello_s(trace)
            if result.returncode != 0 or seconds is None:
                print(f"cli_first_byte: run {run} failed ({result.returncode}): {result.stderr.decode()}",
                      file=sys.stderr)
                return 1
            first_bytes.append(seconds)
            time.sleep(0.3)
        report = {"command": " ".join(["meshq", *command[3:]]), "runs": args.runs,
                  "first_request_byte_s": {"median": statistics.median(first_bytes), "min": min(first_bytes),
                                           "max": max(first_bytes), "all": first_bytes},
                  "whole_command_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)}}
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            fb, wall = report["first_request_byte_s"], report["whole_command_s"]
            print(f"{report['command']}  ({args.runs} runs, 3 nodes, mDNS on 127.0.0.1)")
            print(f"  start -> first request byte: median {fb['median']:.3f} s  (min {fb['min']:.3f}, "
                  f"max {fb['max']:.3f})")
            print(f"  whole command (under strace): median {wall['median']:.3f} s  (min {wall['min']:.3f}, "
                  f"max {wall['max']:.3f})")
        return 0
    finally:
        for node in nodes:
            if node.poll() is None:
                os.kill(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(node.pid, signal.SIGKILL)
                node.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
