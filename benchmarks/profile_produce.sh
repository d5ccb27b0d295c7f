#!/usr/bin/env bash
# Profile one produce mode with py-spy on both sides: the node (a child `meshq node`) and
# the producer (benchmarks/produce_client.py). Needs `pip install py-spy`.
#
#   benchmarks/profile_produce.sh batch 3000000      # produce_batch, pipelined
#   benchmarks/profile_produce.sh sync 20000         # produce, one at a time
#   benchmarks/profile_produce.sh async 300000       # produce_async + flush
#
# Raw profiles and summaries go to $OUT (default /tmp/meshq-profile). Loopback only, no mDNS.
set -euo pipefail
MODE=${1:-batch}
RECORDS=${2:-3000000}
FSYNC=${FSYNC:-interval}
RATE=${RATE:-500}
OUT=${OUT:-/tmp/meshq-profile}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(python -c 'import sys; print(sys.executable)')
mkdir -p "$OUT"
DATA=$(mktemp -d /tmp/meshq-profile-data.XXXXXX)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SPY=""
cleanup() {
  if [[ -n "$SPY" ]]; then
    for pid in $(pgrep -P "$SPY" || true); do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do kill -0 "$SPY" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$SPY" 2>/dev/null || true
    wait "$SPY" 2>/dev/null || true
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT
py-spy record ${SPYFLAGS:---threads --idle} -r "$RATE" --format raw -o "$OUT/node-$MODE.txt" -- \
  "$PY" -m meshq node --data "$DATA" --host 127.0.0.1 --port "$PORT" --no-mdns --fsync "$FSYNC" \
  --partitions 8 --log-level WARNING >"$OUT/node.out" 2>"$OUT/node.err" &
SPY=$!
for _ in $(seq 200); do grep -q '"ready"' "$OUT/node.out" 2>/dev/null && break; sleep 0.05; done
grep -q '"ready"' "$OUT/node.out" || { echo "node did not start"; cat "$OUT/node.err"; exit 1; }
timeout 300 py-spy record ${SPYFLAGS:---threads --idle} -r "$RATE" --format raw -o "$OUT/client-$MODE.txt" -- \
  "$PY" "$HERE/produce_client.py" --seed "127.0.0.1:$PORT" --mode "$MODE" --records "$RECORDS"
cleanup
SPY=""
trap - EXIT
"$PY" "$HERE/pyspy_summary.py" "$OUT/client-$MODE.txt" >"$OUT/client-$MODE.summary"
"$PY" "$HERE/pyspy_summary.py" "$OUT/node-$MODE.txt" >"$OUT/node-$MODE.summary"
echo "summaries: $OUT/client-$MODE.summary $OUT/node-$MODE.summary"
