"""``python -m tests.faults``: one fault run (root only; see ``tests.faults.run``). Exit code 0 when the checker
found nothing (lost = 0, no duplicate, order, offset or divergence problem), 1 otherwise, 2 when not root."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from tests.faults.run import KINDS, run_faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the nemesis injects faults (30)")
    parser.add_argument("--nodes", type=int, default=5, help="storage nodes, each in its own namespace (>= 5)")
    parser.add_argument("--seed", type=int, default=None, help="seeds the fault schedule (default: random, printed)")
    parser.add_argument("--rate", type=float, default=300.0, help="records/s the producer aims at, in total (300)")
    parser.add_argument("--partitions", type=int, default=5)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--tmpfs-mb", type=int, default=256, help="size of each node's data tmpfs (256)")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; choose from {','.join(KINDS)}")
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        print("the fault run needs root and iproute2 (ip netns, tc): network namespaces and tmpfs mounts",
              file=sys.stderr)
        return 2
    report = run_faults(minutes=args.minutes, nodes=args.nodes, seed=args.seed, rate=args.rate,
                        partitions=args.partitions, kinds=kinds, tmpfs_mb=args.tmpfs_mb)
    print(f"RESULT: {'OK' if not report.problems else 'FAILED'} (seed {report.seed}; rerun with --seed "
          f"{report.seed})")
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
