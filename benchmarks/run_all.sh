#!/usr/bin/env bash
# The configurations documented in docs/performance.md. Extra arguments are passed to every
# `meshq bench` run (e.g. --json: one JSON object per scenario). Loopback only; no mDNS.
#   SCENARIOS="produce replication" (default both)
#   produce:     one node vs the raw pyzmq baseline, ~15-30 s
#   replication: 3 nodes, replication factor 3, acks=leader and acks=quorum, beside one node and the
#                baseline, then 3 timed failovers (kill -9 of a partition leader), ~2-3 min
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
    *)
      echo "run_all.sh: unknown scenario $scenario (produce, replication)" >&2
      exit 2
      ;;
  esac
done
exit "$status"
