#!/usr/bin/env bash
# Sets up cross-compiling the camera agent for a Rust target, idempotently, from Debian
# bookworm's own packages (no rustup, no downloads from elsewhere), and prints the
# environment that builds with it:
#
#   eval "$(scripts/cross-toolchain.sh armv7-unknown-linux-gnueabihf)"
#   cargo build --release -p agent --target armv7-unknown-linux-gnueabihf
#
# Steps, each skipped when already done:
#  1. Debian's rustc-web/cargo-web 1.85 (bookworm main): the compiler the target's
#     standard library below was built by; a std only links with its own compiler.
#  2. The target's C cross toolchain (gcc-<triple>): the linker, and the static glibc
#     (libc6-dev-<arch>-cross) the agent links against. qemu-user-static runs the result
#     on this x86_64 machine for the tests.
#  3. The target's architecture known to dpkg (dpkg --add-architecture), so apt can
#     fetch its packages; a failing security index for it is harmless here.
#  4. The target's Rust std (libstd-rust-web-dev and libstd-rust-web-1.85 for that
#     architecture) with `apt-get download` + `dpkg -x` into a private sysroot: a plain
#     multiarch `apt-get install` conflicts with the host's rustc packages.
# Everything stays in $TOOLCHAIN_DIR except the apt packages.
set -euo pipefail

RUST_VERSION=1.85.0+dfsg3-1~deb12u3
TARGET=${1:?usage: cross-toolchain.sh <rust target, e.g. armv7-unknown-linux-gnueabihf>}
TOOLCHAIN_DIR=${TOOLCHAIN_DIR:-$(cd "$(dirname "$0")/.." && pwd)/firmware/.toolchain}

case "$TARGET" in
  armv7-unknown-linux-gnueabihf) ARCH=armhf; GNU=arm-linux-gnueabihf; QEMU=qemu-arm-static ;;
  aarch64-unknown-linux-gnu) ARCH=arm64; GNU=aarch64-linux-gnu; QEMU=qemu-aarch64-static ;;
  *) echo "cross-toolchain: no recipe for $TARGET (known: armv7-unknown-linux-gnueabihf, aarch64-unknown-linux-gnu)" >&2; exit 2 ;;
esac

# Downloads land here and go with the script, however it ends.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log() { echo "cross-toolchain: $*" >&2; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
APT_UPDATED=""
apt_update() {
  if [ -z "$APT_UPDATED" ]; then
    # A foreign architecture's security index may be missing; the main archive is what counts.
    $SUDO apt-get update -qq >&2 || log "apt-get update reported errors (harmless if only a security index failed)"
    APT_UPDATED=1
  fi
}
apt_install() {
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2
}

# 1. The compiler that matches the target std.
if ! /usr/bin/rustc --version 2>/dev/null | grep -q '^rustc 1\.85\.'; then
  log "installing Debian's rustc-web $RUST_VERSION"
  apt_install "rustc-web=$RUST_VERSION" "cargo-web=$RUST_VERSION" \
    "libstd-rust-web-dev=$RUST_VERSION" "libstd-rust-web-1.85=$RUST_VERSION"
fi

# 2. Linker, static C library (only a Recommends of gcc-<triple>, so named here: without
#    it C code such as ring's finds no target headers), emulator.
if ! command -v "$GNU-gcc" >/dev/null || ! command -v "$QEMU" >/dev/null \
    || [ ! -f "/usr/$GNU/lib/libc.a" ]; then
  log "installing gcc-$GNU, libc6-dev-$ARCH-cross and qemu-user-static"
  apt_install "gcc-$GNU" "libc6-dev-$ARCH-cross" qemu-user-static
fi

# 3. The architecture, for apt-get download.
if ! dpkg --print-foreign-architectures | grep -qx "$ARCH"; then
  log "adding the $ARCH architecture to dpkg"
  $SUDO dpkg --add-architecture "$ARCH"
  APT_UPDATED=""
fi

# 4. The target std, in a sysroot of our own.
SYSROOT="$TOOLCHAIN_DIR/sysroot-$TARGET"
if [ ! -d "$SYSROOT/lib/rustlib/$TARGET/lib" ]; then
  log "fetching the $ARCH Rust std $RUST_VERSION"
  apt_update
  std_work="$work/std"
  mkdir -p "$std_work"
  # As root, apt warns that _apt cannot write to the temporary directory; harmless.
  (cd "$std_work" && apt-get download -q \
    "libstd-rust-web-dev:$ARCH=$RUST_VERSION" "libstd-rust-web-1.85:$ARCH=$RUST_VERSION" >&2)
  mkdir -p "$std_work/root"
  for deb in "$std_work"/*.deb; do dpkg -x "$deb" "$std_work/root"; done
  mkdir -p "$SYSROOT/lib/rustlib"
  rm -rf "$SYSROOT/lib/rustlib/$TARGET"
  cp -a "$std_work/root/usr/lib/rustlib/$TARGET" "$SYSROOT/lib/rustlib/$TARGET"
  rm -rf "$std_work"
fi

# 5. For the package test in `make test`: Debian's static busybox for the target, the
#    userland of a minimal emulated camera root.
BUSYBOX="$TOOLCHAIN_DIR/busybox-static_$ARCH.deb"
if [ ! -f "$BUSYBOX" ]; then
  log "fetching busybox-static:$ARCH for the emulated camera root"
  apt_update
  (cd "$work" && apt-get download -q "busybox-static:$ARCH" >&2)
  mkdir -p "$TOOLCHAIN_DIR"
  mv "$work"/busybox-static_*.deb "$BUSYBOX"
fi

triple_env=$(echo "$TARGET" | tr 'a-z-' 'A-Z_')
cat <<EOF
export RUSTC=/usr/bin/rustc
export CARGO=/usr/bin/cargo
export CARGO_TARGET_${triple_env}_LINKER=$GNU-gcc
export CARGO_TARGET_${triple_env}_RUSTFLAGS="--sysroot $SYSROOT -C target-feature=+crt-static"
export CARGO_TARGET_${triple_env}_RUNNER=$QEMU
export CC_${TARGET//-/_}=$GNU-gcc
EOF
