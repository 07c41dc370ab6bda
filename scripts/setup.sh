#!/usr/bin/env bash
# Installs what `make demo` and `make test` need on Debian 12, idempotently:
# - a Rust toolchain (kept if present; otherwise Debian's rustc-web/cargo-web 1.85,
#   the oldest toolchain this workspace promises to build with);
# - the camera simulator's parts: GStreamer's RTSP server with its Python bindings
#   (python3-gi, run by /usr/bin/python3) and the encoders x265enc (plugins-bad) and
#   x264enc (plugins-ugly);
# - the Watchers: ffprobe/ffmpeg, and GStreamer's rtspsrc (gst-launch-1.0, with the
#   libav decoders);
# - the test network: iproute2 (network namespaces, veth), iptables (the NAT router
#   in front of the cameras' LANs), conntrack (the router forgets its UDP mappings,
#   so the camera's public port changes: NAT rebinding) and curl (a client of the
#   relay's HTTP side);
# - dnsmasq (only the binary, dnsmasq-base: no service), the home router's DNS server
#   when the firmware test resolves the relay's name on the emulated camera;
# - Chromium's headless build, the browser that drives the operator's console in its
#   tests;
# - promtool, from the prometheus package, to check the relay's metrics, and Python's
#   jsonschema and yaml, to check the API's responses against its OpenAPI document.
# It runs apt only when something is missing, so a second run costs nothing.
set -euo pipefail

APT_PACKAGES=(
  python3-gi
  gir1.2-gst-rtsp-server-1.0
  gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly
  gstreamer1.0-libav
  gstreamer1.0-tools
  ffmpeg
)
RUST_VERSION=1.85.0+dfsg3-1~deb12u3

missing=()
have_camera_sim() {
  /usr/bin/python3 - <<'PY' 2>/dev/null
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
for element in ("x264enc", "x265enc", "rtph264pay", "rtph265pay", "videotestsrc"):
    assert Gst.ElementFactory.find(element), element
PY
}
have_watchers() {
  command -v ffprobe >/dev/null && command -v gst-launch-1.0 >/dev/null \
    && gst-inspect-1.0 avdec_h264 >/dev/null 2>&1 && gst-inspect-1.0 avdec_h265 >/dev/null 2>&1
}
if ! have_camera_sim || ! have_watchers; then
  missing+=("${APT_PACKAGES[@]}")
fi
if ! command -v ip >/dev/null || ! command -v iptables >/dev/null || ! command -v curl >/dev/null; then
  missing+=(iproute2 iptables curl)
fi
if ! command -v conntrack >/dev/null; then
  missing+=(conntrack)
fi
if [ ! -x /usr/sbin/dnsmasq ]; then
  missing+=(dnsmasq-base)
fi
# promtool (checks the relay's /metrics in the tests) ships in Debian's prometheus
# package; without systemd nothing of it is started.
if ! command -v promtool >/dev/null; then
  missing+=(prometheus)
fi
# The API's responses are checked against docs/api.yaml with jsonschema.
if ! /usr/bin/python3 -c "import jsonschema, yaml" 2>/dev/null; then
  missing+=(python3-jsonschema python3-yaml)
fi
# The relay cluster's store: the tests start a 3-member etcd of their own (Debian's
# etcd-server 3.4; its service is not started here). protoc builds the relay's etcd
# client (gRPC).
if [ ! -x /usr/bin/etcd ]; then
  missing+=(etcd-server etcd-client)
fi
if ! command -v protoc >/dev/null; then
  missing+=(protobuf-compiler)
fi
# The console's tests drive a real browser: Chromium's headless build (no display
# libraries), with a font to render the page in.
if [ ! -x /usr/bin/chromium-headless-shell ] && [ ! -x /usr/bin/chromium ]; then
  missing+=(chromium-headless-shell fonts-liberation)
fi
if ! command -v cargo >/dev/null; then
  missing+=("rustc-web=$RUST_VERSION" "cargo-web=$RUST_VERSION"
            "libstd-rust-web-dev=$RUST_VERSION" "libstd-rust-web-1.85=$RUST_VERSION")
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: everything needed is installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# An index that fails to refresh (e.g. a foreign architecture's security index) is
# harmless as long as the packages above resolve; the install below says if not.
$SUDO apt-get update -q || echo "setup: apt-get update reported errors; trying the install anyway" >&2
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
have_camera_sim || { echo "setup: GStreamer RTSP server still unusable after install" >&2; exit 1; }
have_watchers || { echo "setup: ffprobe or GStreamer decoders still missing after install" >&2; exit 1; }
echo "setup: done"
