"""Wait until the machine is quiet (other processes use little CPU), so figures are not polluted.

    python benchmarks/wait_quiet.py [--threshold 0.15] [--seconds 2] [--max-wait 120]

Exits 0 once the whole machine used less than ``--threshold`` cores over ``--seconds``
(measured from /proc/stat), or 1 after ``--max-wait`` seconds. Linux only; elsewhere exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

from meshq.bench.cpu import machine_busy


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", type=float, default=0.15, help="cores busy at most (default 0.15)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measurement window (default 2 s)")
    parser.add_argument("--max-wait", type=float, default=120.0, help="give up after this many seconds")
    args = parser.parse_args()
    if machine_busy() is None:
        return 0
    deadline = time.monotonic() + args.max_wait
    while True:
        first = machine_busy()
        time.sleep(args.seconds)
        second = machine_busy()
        assert first is not None and second is not None
        busy = (second[0] - first[0]) / args.seconds
        if busy < args.threshold:
            print(f"machine quiet: {busy:.2f} cores busy over {args.seconds:.0f} s", file=sys.stderr)
            return 0
        if time.monotonic() >= deadline:
            print(f"machine still busy ({busy:.2f} cores) after {args.max_wait:.0f} s; running anyway",
                  file=sys.stderr)
            return 1
        print(f"waiting for a quiet machine: {busy:.2f} cores busy", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
