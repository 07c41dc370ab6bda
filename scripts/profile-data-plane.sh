#!/usr/bin/env bash
# Where the data plane's CPU goes: one bulk session camera→Watcher through the release
# relay and agent on loopback, sampled with `perf record` on both, and the hottest
# symbols of each printed (docs/benchmarks.md, "Where the CPU goes").
#
#   scripts/profile-data-plane.sh [BYTES]     (default 1 GiB; needs linux-perf)
#
# Uses target/release (build it first: `cargo build --release -p relay -p agent -p bench`).
set -euo pipefail
cd "$(dirname "$0")/.."
BYTES=${1:-1073741824}
BIN=target/release
OUT=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$OUT"; }
trap cleanup EXIT

command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }

"$BIN/bench" target --listen 127.0.0.1:0 > "$OUT/target.log" &
PIDS+=($!)
until grep -q READY "$OUT/target.log"; do sleep 0.1; done
TARGET=$(awk '/READY/ {print $2}' "$OUT/target.log")

RELAY_TOKEN=profile RELAY_LOG=warn,relay=info "$BIN/relay" --bind 127.0.0.1 --port 18080 \
  --tunnel-port 18554 --data-shards 1 > "$OUT/relay.log" 2>&1 &
RELAY=$!
PIDS+=($RELAY)
until grep -q "relay ready" "$OUT/relay.log"; do sleep 0.1; done

cat > "$OUT/agent.json" <<EOF
{"agent": {"agent_id": "profile", "tunnel_server_url": "ws://127.0.0.1:18080/tunnel",
           "tunnel_server_token": "profile", "log_level": "WARNING"},
 "tunnel": {"tunnel_port": 18554},
 "streaming": {"rtsp_host": "${TARGET%:*}", "rtsp_port": ${TARGET##*:}}}
EOF
AGENT_LOG=warn,agent=info "$BIN/camera-agent" --config "$OUT/agent.json" > "$OUT/agent.log" 2>&1 &
AGENT=$!
PIDS+=($AGENT)
until grep -q "online" "$OUT/agent.log"; do sleep 0.1; done

perf record -F 2000 -g -o "$OUT/relay.perf" -p "$RELAY" 2> /dev/null &
PERF_RELAY=$!
perf record -F 2000 -g -o "$OUT/agent.perf" -p "$AGENT" 2> /dev/null &
PERF_AGENT=$!
sleep 0.5
"$BIN/bench" client throughput 127.0.0.1:18554 --bytes "$BYTES"
kill -INT "$PERF_RELAY" "$PERF_AGENT"
wait "$PERF_RELAY" "$PERF_AGENT" 2>/dev/null || true

for side in relay agent; do
  echo "== $side: share of samples by symbol (self) =="
  perf report -i "$OUT/$side.perf" --no-children -g none --sort symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -25 || true
  echo "== $side: by shared object =="
  perf report -i "$OUT/$side.perf" --no-children -g none --sort dso --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -8 || true
done
