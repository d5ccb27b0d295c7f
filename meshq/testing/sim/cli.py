"""The simulator's command line, ``python -m meshq.testing.sim``: argument parsing and output only.

``--seed N`` replays one seed and prints its trace (``--quiet``: only the verdict); ``--seeds K``
runs K seeds from ``--start`` and prints each failure with its replay command, then a tally.
"""

from __future__ import annotations

import argparse
import time

from meshq.testing.sim.simulation import run_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshq.testing.sim",
                                     description="deterministic meshq cluster simulation")
    parser.add_argument("--seed", type=int, default=None, help="replay one seed and print its trace")
    parser.add_argument("--seeds", type=int, default=None, help="run this many seeds")
    parser.add_argument("--start", type=int, default=0, help="first seed of --seeds")
    parser.add_argument("--quiet", action="store_true", help="with --seed: no trace, only the summary")
    parser.add_argument("--rpc", action="store_true", help="add request/reply (services on the storage nodes)")
    args = parser.parse_args(argv)
    extra = {"rpc": True} if args.rpc else {}
    if args.seed is not None:
        result = run_seed(args.seed, **extra)
        if not args.quiet:
            print("\n".join(result.trace))
        print(result.summary())
        print(f"options: {result.options}")
        for violation in result.violations:
            print(f"VIOLATION: {violation}")
        return 0 if result.ok else 1
    count = args.seeds or 100
    failed = []
    membership = {"with a join": 0, "with a leave": 0, "with a removal by timeout": 0}
    steps = 0
    direct = {"direct_produces": 0, "direct_retries": 0, "direct_failed": 0}
    started = time.monotonic()
    for seed in range(args.start, args.start + count):
        result = run_seed(seed, **extra)
        stats = result.stats
        membership["with a join"] += stats["joins"] > 0
        membership["with a leave"] += stats["leaves"] > 0
        membership["with a removal by timeout"] += stats.get("timeout_removals", 0) > 0
        steps += stats.get("reassign_steps", 0)
        for name in direct:
            direct[name] += stats.get(name, 0)
        if not result.ok:
            failed.append(seed)
            print(f"FAILED {result.summary()}\n  options: {result.options}\n  {result.violations[0]}\n"
                  f"  replay: python -m meshq.testing.sim --seed {seed}{' --rpc' if args.rpc else ''}", flush=True)
    elapsed = time.monotonic() - started
    print(f"membership changes: {', '.join(f'{n} runs {what}' for what, n in membership.items())}; "
          f"{steps} reassign steps applied")
    print(f"calling threads: {direct['direct_produces']} produces acknowledged from a thread, "
          f"{direct['direct_retries']} retried attempts, {direct['direct_failed']} calls failed")
    print(f"{count - len(failed)} passed, {len(failed)} failed in {elapsed:.1f} s"
          + (f" (failed seeds: {failed})" if failed else ""))
    return 1 if failed else 0
