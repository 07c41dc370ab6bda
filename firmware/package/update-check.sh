#!/bin/sh
# Run before every start of camera-agent (by the supervisor, or systemd's
# ExecStartPre). After an over-the-air update the new agent is on trial
# (update.trial) until it is online; if it fails to start MAX_STARTS times in a
# row, the previous agent (camera-agent.old) is put back and the reason written
# for it to report (update.rolledback). docs/updates.md says what happens if power
# fails at each step. POSIX sh with builtins and mv/rm only (busybox ash).
#   sh update-check.sh [PREFIX]
PREFIX=${1:-@PREFIX@}
MAX_STARTS=3
trial="$PREFIX/update.trial"
[ -f "$trial" ] || exit 0
starts=0
if [ -f "$PREFIX/update.boots" ]; then
  read -r starts < "$PREFIX/update.boots" || starts=0
fi
case "$starts" in ''|*[!0-9]*) starts=0 ;; esac
if [ "$starts" -lt "$MAX_STARTS" ]; then
  printf '%s\n' "$((starts + 1))" > "$PREFIX/update.boots"
  exit 0
fi
id="" from="" to=""
while IFS='=' read -r key value; do
  case "$key" in id) id=$value ;; from) from=$value ;; to) to=$value ;; esac
done < "$trial"
# One rename puts the previous binary back; if power failed after it, the next run
# finds no camera-agent.old and only finishes the record.
if [ -f "$PREFIX/camera-agent.old" ]; then
  mv -f "$PREFIX/camera-agent.old" "$PREFIX/camera-agent"
fi
printf 'id=%s\nfrom=%s\nto=%s\nwhy=%s\n' "$id" "$to" "$from" \
  "the new agent ($to) stopped $starts times in a row before it was online; the previous one ($from) is back" \
  > "$PREFIX/update.rolledback.tmp"
mv -f "$PREFIX/update.rolledback.tmp" "$PREFIX/update.rolledback"
rm -f "$trial" "$PREFIX/update.boots"
echo "camera-agent: the update to $to failed to start $starts times; rolled back to $from"
