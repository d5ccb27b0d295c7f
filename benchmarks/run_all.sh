#!/usr/bin/env bash
# The configuration documented in docs/performance.md. Extra arguments are passed to
# `meshq bench produce` (e.g. --json). Loopback only; no mDNS; ~15-30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# Other work on a 2-core machine distorts every figure: wait (bounded) for a quiet moment.
"$PY" benchmarks/wait_quiet.py --threshold 0.15 --max-wait "${MAX_WAIT:-120}" || true
exec "$PY" -m meshq bench produce --records 1000000 --sync-records 5000 --value-bytes 100 --batch 1000 \
  --acks leader --fsync interval "$@"
