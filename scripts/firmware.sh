#!/usr/bin/env bash
# make firmware CAMERA=<model> [RELAY_URL=… AGENT_ID=… TOKEN=… CA=… AGENT_CERT=… AGENT_KEY=… FALLBACK_DNS=…]
#               [VERSION=… RELEASE_PUB=… RELEASE_KEY=…]
# Builds the static, size-optimised camera-agent for the camera's profile
# (firmware/cameras/<model>.toml) and packs firmware/dist/<model>/<model>_firmware.tar.gz.
# VERSION stamps another version into the agent (packed under
# firmware/dist/<model>-<VERSION>/); RELEASE_PUB puts the release key cameras trust for
# over-the-air updates into the package; RELEASE_KEY signs the binary for them
# (camera-agent.sig beside it, for POST /releases). docs/updates.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

CAMERA=${CAMERA:-}
profile="firmware/cameras/$CAMERA.toml"
if [ -z "$CAMERA" ] || [ ! -f "$profile" ]; then
  echo "firmware: unknown camera ${CAMERA:-(none)}; known models:" >&2
  for f in firmware/cameras/*.toml; do
    echo "  $(basename "$f" .toml)" >&2
  done
  echo "usage: make firmware CAMERA=<model> [RELAY_URL=… AGENT_ID=… TOKEN=… CA=… AGENT_CERT=… AGENT_KEY=… FALLBACK_DNS=…]" >&2
  exit 2
fi

# The profile, as shell variables (Python's tomllib reads TOML; Debian 12 has 3.11).
eval "$(/usr/bin/python3 - "$profile" <<'PY'
import shlex, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
for key in ("name", "description", "rust_target", "rtsp_port", "install_prefix"):
    print(f"P_{key}={shlex.quote(str(p[key]))}")
PY
)"
target=$P_rust_target
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
dist="firmware/dist/$P_name"
if [ -n "${VERSION:-}" ]; then
  version=$VERSION
  dist="firmware/dist/$P_name-$VERSION"
fi
stage="$dist/${P_name}_firmware"

# The host's cargo (the cross toolchain brings its own) runs `certs sign`.
host_cargo=$(command -v cargo || true)
echo "1/4 cross toolchain for $target (scripts/cross-toolchain.sh)"
eval "$(scripts/cross-toolchain.sh "$target")"

echo "2/4 building camera-agent for $target (profile firmware: opt-level z, LTO, panic=abort, stripped, static)"
CAMERA_AGENT_VERSION=${VERSION:-} \
  "$CARGO" build --locked --profile firmware -p agent --bin camera-agent --target "$target"
binary="target/$target/firmware/camera-agent"

echo "3/4 packing $stage"
rm -rf "$stage"
mkdir -p "$stage"
cp "$binary" "$stage/camera-agent"
if [ -n "${RELEASE_PUB:-}" ]; then
  cp "$RELEASE_PUB" "$stage/release.pub"
fi
if [ -n "${RELEASE_KEY:-}" ]; then
  env -u RUSTC -u CARGO "${host_cargo:-$CARGO}" run --quiet --locked -p certs -- sign "$stage/camera-agent" --key "$RELEASE_KEY" \
    --target "$target" --version "$version" --force
fi
for pair in "CA:ca.crt" "AGENT_CERT:agent.crt" "AGENT_KEY:agent.key"; do
  var=${pair%%:*}
  file=${pair#*:}
  if [ -n "${!var:-}" ]; then
    cp "${!var}" "$stage/$file"
    chmod 600 "$stage/$file"
  fi
done
RELAY_URL=${RELAY_URL:-} AGENT_ID=${AGENT_ID:-} TOKEN=${TOKEN:-} FALLBACK_DNS=${FALLBACK_DNS:-} \
  /usr/bin/python3 - "$profile" "$stage/config.json" <<'PY'
import json, os, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
config = {
    "agent": {
        "agent_id": os.environ["AGENT_ID"] or p["name"] + "-001",
        "tunnel_server_url": os.environ["RELAY_URL"] or "wss://relay.example.com:8080/tunnel",
        "tunnel_server_token": os.environ["TOKEN"],
        "log_level": "INFO",
        "camera_model": p["name"],
    },
    "tunnel": {"tunnel_port": 0},
    "streaming": {"rtsp_port": p["rtsp_port"], "stream_paths": p["stream_paths"]},
    "network": {"connection_timeout": 30, "reconnect_interval": 10, "heartbeat_interval": 30},
}
# Nameservers to ask when the camera's own resolver cannot find the relay (a camera
# with no /etc/resolv.conf): FALLBACK_DNS=192.168.1.1,1.1.1.1.
fallback = [s.strip() for s in os.environ["FALLBACK_DNS"].split(",") if s.strip()]
if fallback:
    config["network"]["fallback_nameservers"] = fallback
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
chmod 600 "$stage/config.json"
for file in install.sh uninstall.sh update-check.sh INSTALL.md; do
  sed -e "s|@PREFIX@|$P_install_prefix|g" -e "s|@CAMERA@|$P_name|g" \
      -e "s|@VERSION@|$version|g" -e "s|@TARGET@|$target|g" \
      -e "s|@DESCRIPTION@|$P_description|g" "firmware/package/$file" > "$stage/$file"
done
chmod 755 "$stage/install.sh" "$stage/uninstall.sh" "$stage/update-check.sh"
echo "$version ($(git rev-parse --short HEAD 2>/dev/null || echo unknown)) $target" > "$stage/VERSION"
(cd "$stage" && sha256sum -- * | grep -v ' SHA256SUMS$' > SHA256SUMS)

echo "4/4 archiving"
package="$dist/${P_name}_firmware.tar.gz"
tar -C "$dist" -czf "$package" "${P_name}_firmware"
echo
echo "package: $package ($(du -k "$package" | cut -f1) KiB)"
echo "binary:  $(du -k "$binary" | cut -f1) KiB ($target, static, stripped)"
