#!/bin/sh
# Removes camera-agent: stops it, removes its service or init script and @PREFIX@
# (config and credentials included). POSIX sh for busybox ash.
set -eu
PREFIX=${1:-@PREFIX@}
NAME=camera-agent
if command -v systemctl >/dev/null 2>&1 && [ -f /etc/systemd/system/$NAME.service ]; then
  systemctl disable --now $NAME >/dev/null 2>&1 || true
  rm -f /etc/systemd/system/$NAME.service
  systemctl daemon-reload
fi
if [ -f /etc/init.d/S99$NAME ]; then
  /etc/init.d/S99$NAME stop 2>/dev/null || true
  rm -f /etc/init.d/S99$NAME
fi
created=""
if [ -f "$PREFIX/.created-dirs" ]; then
  while IFS= read -r dir; do created="$created $dir"; done < "$PREFIX/.created-dirs"
fi
rm -rf "$PREFIX"
# The directories install.sh created, deepest first, if nothing else lives there now.
for dir in $created; do
  rmdir "$dir" 2>/dev/null || true
done
echo "camera-agent removed"
