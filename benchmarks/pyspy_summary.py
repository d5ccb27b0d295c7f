"""Summarize a ``py-spy record --format raw --threads`` file: busy share per thread, top functions.

    python benchmarks/pyspy_summary.py profile.txt [--top 25] [--rate 500 --seconds 10]

Self time = samples whose innermost frame is the function; inclusive = samples with the
function anywhere on the stack (counted once per sample).
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    threads: collections.Counter = collections.Counter()
    self_time: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    with open(args.path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count_text = line.rpartition(" ")
            count = int(count_text)
            frames = stack.split(";")
            thread = frames[0] if frames and frames[0].startswith("thread") else "all"
            if thread != "all":
                frames = frames[1:]
            # strip the line number so one function aggregates: "name (file:line)" -> "name (file)"
            names = [re.sub(r":\d+\)$", ")", fr) for fr in frames]
            threads[thread] += count
            total += count
            if names:
                self_time[thread][names[-1]] += count
            for name in set(names):
                inclusive[thread][name] += count
    print(f"{total} samples")
    for thread, n in threads.most_common():
        print(f"\n=== {thread}: {n} samples ({n / total:.0%})")
        print("  self%  incl%  function")
        rows = sorted(inclusive[thread].items(), key=lambda kv: -kv[1])[: args.top]
        for name, incl in rows:
            print(f"  {self_time[thread][name] / n:5.1%} {incl / n:6.1%}  {name}")
        print("  -- top self time --")
        for name, s in self_time[thread].most_common(args.top):
            print(f"  {s / n:5.1%} {inclusive[thread][name] / n:6.1%}  {name}")


if __name__ == "__main__":
    main()
