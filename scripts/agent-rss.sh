#!/usr/bin/env bash
# The agent's memory while a Watcher pulls both of a camera's streams through it:
#   scripts/agent-rss.sh [SECONDS] [AGENT COMMAND...]
# e.g. scripts/agent-rss.sh 30 qemu-arm-static target/armv7-unknown-linux-gnueabihf/firmware/camera-agent
#      scripts/agent-rss.sh 30 target/firmware/camera-agent
# Runs the camera simulator (main 1280x720 H.265 at 4 Mbit/s, sub H.264 at 512 kbit/s,
# a noise pattern so the encoder fills its bitrate), a relay and the agent on loopback
# ports 18080, 18554 and 18600, pulls both streams with ffmpeg over TCP for SECONDS,
# and prints the agent's VmRSS before, at its peak during, and VmHWM. Under qemu-user
# the numbers are the qemu process's: the agent plus qemu's own memory and translated
# code (qemu-arm-static running busybox `sleep` alone is about 11.5 MiB here).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
if [ $# -eq 0 ]; then set -- target/firmware/camera-agent; fi
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Waits until FILE has a line matching PATTERN (up to 60 s).
wait_for() {
  for _ in $(seq 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "agent-rss: no \"$2\" in $1:" >&2
  cat "$1" >&2
  exit 1
}

cargo build --quiet --locked -p relay
/usr/bin/python3 e2e/camera-sim/camera_sim.py --port 18554 --no-auth --pattern snow \
  --main-size 1280x720 --main-kbps 4096 --sub-kbps 512 >"$work/camera.log" 2>&1 &
pids+=($!)
RELAY_TOKEN=rss target/debug/relay --bind 127.0.0.1 --port 18080 --tunnel-port 18600 \
  >"$work/relay.log" 2>&1 &
pids+=($!)
wait_for "$work/camera.log" "READY port="
wait_for "$work/relay.log" "relay ready"
cat >"$work/agent.json" <<JSON
{"agent": {"agent_id": "rss", "tunnel_server_url": "ws://127.0.0.1:18080/tunnel",
           "tunnel_server_token": "rss"},
 "tunnel": {"tunnel_port": 18600}, "streaming": {"rtsp_port": 18554}}
JSON
"$@" --config "$work/agent.json" >"$work/agent.log" 2>&1 &
agent=$!
pids+=("$agent")
wait_for "$work/agent.log" "online: the relay serves this camera"
rss() { awk "/^$1:/{print \$2}" "/proc/$agent/status"; }
echo "agent: $*"
echo "idle: $(rss VmRSS) KiB"

pulls=()
for sub in 0 1; do
  timeout $((secs + 20)) ffmpeg -nostdin -loglevel fatal -rtsp_transport tcp \
    -i "rtsp://127.0.0.1:18600/cam/realmonitor?channel=1&subtype=$sub" -t "$secs" -f null - &
  pulls+=($!)
done
peak=0
for _ in $(seq $((secs * 2))); do
  now=$(rss VmRSS)
  [ "$now" -gt "$peak" ] && peak=$now
  sleep 0.5
done
wait "${pulls[@]}"
echo "pulling two streams for ${secs}s: peak $peak KiB, VmHWM $(rss VmHWM) KiB"
grep "media of the Watcher session" "$work/relay.log" | sed 's/.*media of the Watcher session/relay measured:/'
