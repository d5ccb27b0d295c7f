"""The fault run's independent checker: pure functions over what the clients saw and what the nodes hold.

Inputs are plain tuples, gathered through public surfaces only: the producer's attempts (``Node.produce`` results),
the records a consumer read during the run and the final drain (``Node.consumer``), the high watermarks
(``status``), and each replica's stored batches read offline from its stopped data directory
(``tests.multinode.helpers.check_replicas_identical``, through ``meshq.log``'s reader). Nothing here imports meshq.

Rules (each violation is a problem; ``lost`` must be 0):
- every acknowledged (partition, offset, value) is in the drain at exactly that position (else LOST);
- every value is stored at most once (values are unique per attempt, so a second copy is a DUPLICATE; for an
  acknowledged value that breaks exactly-once);
- per partition the drained offsets are 0..hw-1, each once, in order, and reach the high watermark (OFFSETS);
- the producer's acknowledged offsets of one partition grow in the order the calls were made (ORDER);
- no drained value was never produced (UNEXPECTED);
- every record a live consumer saw at a position is the one the final log holds there (LIVE READ DIVERGED: a
  consumer was served something that was later rewritten, i.e. uncommitted or divergent data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# (partition, offset | None, value, started_s, ended_s, error | None)
Attempt = tuple[int, "int | None", str, float, float, "str | None"]


@dataclass
class Verdict:
    attempts: int = 0
    acked: int = 0
    drained: int = 0
    live_seen: int = 0
    stored_unacked: int = 0  # values stored although their call raised (allowed: an error means "maybe")
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    offsets: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    live_diverged: list[str] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)  # divergent replicas (filled by the runner)
    errors: dict[str, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        for label, items in (("LOST acknowledged records", self.lost), ("DUPLICATED records", self.duplicates),
                             ("OFFSET problems", self.offsets), ("ORDER violations", self.order),
                             ("UNEXPECTED records", self.unexpected), ("LIVE READ DIVERGED", self.live_diverged),
                             ("REPLICAS DIVERGE", self.replicas)):
            if items:
                out.append(f"{label} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        return out


def check(attempts: list[Attempt], drained: list[tuple[int, int, str]], high_watermarks: dict[int, int],
          live: list[tuple[int, int, str]] = ()) -> Verdict:
    verdict = Verdict(attempts=len(attempts), drained=len(drained), live_seen=len(live))
    at: dict[tuple[int, int], str] = {}
    where: dict[str, list[tuple[int, int]]] = {}
    per_partition: dict[int, list[int]] = {}
    for partition, offset, value in drained:
        if (partition, offset) in at:
            verdict.offsets.append(f"position {(partition, offset)} delivered twice")
        at[(partition, offset)] = value
        where.setdefault(value, []).append((partition, offset))
        per_partition.setdefault(partition, []).append(offset)
    for partition in sorted(set(per_partition) | set(high_watermarks)):
        offsets = per_partition.get(partition, [])
        if offsets != list(range(len(offsets))):
            bad = next(i for i, o in enumerate(offsets) if o != i)
            verdict.offsets.append(f"partition {partition}: offsets not dense from 0 in order at index {bad}: "
                                   f"{offsets[max(0, bad - 3):bad + 3]}")
        if partition in high_watermarks and len(offsets) != high_watermarks[partition]:
            verdict.offsets.append(f"partition {partition}: drained {len(offsets)} records, high watermark "
                                   f"{high_watermarks[partition]}")
    attempted = {a[2] for a in attempts}
    acked_values = set()
    last_acked: dict[int, Attempt] = {}
    for a in sorted(attempts, key=lambda a: a[3]):  # one sequential producer per partition: start time = call order
        partition, offset, value, _, _, error = a
        if error is not None:
            verdict.errors[error] = verdict.errors.get(error, 0) + 1
            continue
        verdict.acked += 1
        acked_values.add(value)
        if at.get((partition, offset)) != value:
            verdict.lost.append(f"{value} acked at {(partition, offset)}; that position holds "
                                f"{at.get((partition, offset))!r}; the value is at {where.get(value) or 'no position'}")
        before = last_acked.get(partition)
        if before is not None and offset <= before[1]:
            verdict.order.append(f"partition {partition}: {before[2]} acked at {before[1]}, later {value} at {offset}")
        last_acked[partition] = a
    for value, positions in where.items():
        if value not in attempted:
            verdict.unexpected.append(f"{value!r} at {positions[:3]}")
        if len(positions) > 1:
            kind = "acknowledged" if value in acked_values else "unacknowledged"
            verdict.duplicates.append(f"{kind} {value} stored at {positions}")
    verdict.stored_unacked = sum(1 for v in where if v in attempted and v not in acked_values)
    for partition, offset, value in live:
        if at.get((partition, offset)) != value:
            verdict.live_diverged.append(f"a consumer read {value!r} at {(partition, offset)}; the final log holds "
                                         f"{at.get((partition, offset))!r}")
    verdict.errors = dict(sorted(verdict.errors.items()))
    return verdict


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
