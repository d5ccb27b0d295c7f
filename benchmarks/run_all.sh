#!/usr/bin/env bash
# The configurations documented in docs/performance.md. Extra arguments are passed to every
# `meshq bench` run (e.g. --json: one JSON object per scenario). Loopback only; no mDNS.
#   SCENARIOS="produce replication" (the default; rebalance only when named: SCENARIOS=rebalance)
#   produce:     one node vs the raw pyzmq baseline, ~15-30 s
#   replication: 3 nodes, replication factor 3, acks=leader and acks=quorum, beside one node and the
#                baseline, then 3 timed failovers (kill -9 of a partition leader), ~2-3 min
#   rebalance:   3 nodes, replication factor 3, 12 partitions preloaded with 10M records (1 GB per node),
#                then a 4th node joins and one of the first three leaves (meshq leave), each timed until
#                handoffs == 0, while a producer writes 20,000 records/s; ~1 min, ~4 GB in $TMPDIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SCENARIOS=${SCENARIOS:-"produce replication"}
status=0
for scenario in $SCENARIOS; do
  # Other work on a 2-core machine distorts every figure: wait (bounded) for a quiet moment.
  "$PY" benchmarks/wait_quiet.py --threshold 0.15 --max-wait "${MAX_WAIT:-120}" || true
  case "$scenario" in
    produce)
      "$PY" -m meshq bench produce --records 1000000 --sync-records 5000 --value-bytes 100 --batch 1000 \
        --acks leader --fsync interval "$@" || status=$?
      ;;
    replication)
      "$PY" -m meshq bench replication --nodes 3 --replication-factor 3 --records 1000000 --sync-records 5000 \
        --value-bytes 100 --batch 1000 --fsync interval --failover-repeats 3 "$@" || status=$?
      ;;
    rebalance)
      "$PY" -m meshq bench rebalance --nodes 3 --replication-factor 3 --records 10000000 --value-bytes 100 \
        --batch 1000 --fsync interval --load-rate 20000 "$@" || status=$?
      ;;
    *)
      echo "run_all.sh: unknown scenario $scenario (produce, replication, rebalance)" >&2
      exit 2
      ;;
  esac
done
exit "$status"
