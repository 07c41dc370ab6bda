#!/bin/sh
# Removes camera-agent: stops it, removes its service or init script and @PREFIX@
# (config and credentials included). POSIX sh; runs under busybox ash.
set -eu
PREFIX=${1:-@PREFIX@}
NAME=camera-agent
if command -v systemctl >/dev/null 2>&1 && [ -f /etc/systemd/system/$NAME.service ]; then
  systemctl disable --now $NAME >/dev/null 2>&1 || true
  rm -f /etc/systemd/system/$NAME.service
  systemctl daemon-reload
fi
if [ -f /etc/init.d/S99$NAME ]; then
  /etc/init.d/S99$NAME stop || true
  rm -f /etc/init.d/S99$NAME
fi
# The supervisor may take a moment to reap the agent.
i=0
while [ -f "$PREFIX/supervise.pid" ] && [ $i -lt 20 ]; do sleep 0.2; i=$((i + 1)); done
rm -rf "$PREFIX"
echo "camera-agent removed"
