#!/bin/sh
# Installs camera-agent on the camera. POSIX sh for busybox ash, using only shell
# builtins and busybox's no-exec applets (mkdir, cp, mv, chmod, rm), so it also runs in
# an emulated root without binfmt_misc.
#   sh install.sh                   install to @PREFIX@ and start the agent
#   sh install.sh /other/dir        install elsewhere
#   sh install.sh --no-start [DIR]  install only (e.g. into a camera image being built)
# An existing config.json (and credentials) are kept, so this also upgrades.
set -eu
case "$0" in */*) here=${0%/*} ;; *) here=. ;; esac
here=$(cd "$here" && pwd)
START=yes
if [ "${1:-}" = "--no-start" ]; then START=no; shift; fi
PREFIX=${1:-@PREFIX@}
NAME=camera-agent

echo "camera-agent @VERSION@ for @CAMERA@: installing to $PREFIX"
# Directories this creates, deepest first, so uninstall.sh removes exactly those.
created=""
note_new_dirs() {
  d=$1
  while [ -n "$d" ] && [ ! -d "$d" ]; do
    created="$created$d
"
    d=${d%/*}
  done
}
note_new_dirs "$PREFIX"
mkdir -p "$PREFIX"
cp "$here/$NAME" "$PREFIX/$NAME.new"
chmod 755 "$PREFIX/$NAME.new"
mv -f "$PREFIX/$NAME.new" "$PREFIX/$NAME"

if [ -f "$PREFIX/config.json" ]; then
  echo "keeping the existing $PREFIX/config.json"
else
  cp "$here/config.json" "$PREFIX/config.json"
  chmod 600 "$PREFIX/config.json"
fi
for file in ca.crt agent.crt agent.key; do
  if [ -f "$here/$file" ] && [ ! -f "$PREFIX/$file" ]; then
    cp "$here/$file" "$PREFIX/$file"
    chmod 600 "$PREFIX/$file"
  fi
done
# The release key(s) the agent trusts for over-the-air updates (public: replaced by a
# newer package's), and the check the supervisor runs before every start.
if [ -f "$here/release.pub" ]; then
  cp "$here/release.pub" "$PREFIX/release.pub"
  chmod 644 "$PREFIX/release.pub"
fi
for file in uninstall.sh update-check.sh; do
  cp "$here/$file" "$PREFIX/$file"
  chmod 755 "$PREFIX/$file"
done

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  printf '%s\n' \
    '[Unit]' \
    'Description=Camera tunnel agent' \
    'After=network-online.target' \
    'Wants=network-online.target' \
    '# Never give up: a failing update is rolled back by update-check.sh on a later start.' \
    'StartLimitIntervalSec=0' \
    '' \
    '[Service]' \
    "ExecStartPre=/bin/sh $PREFIX/update-check.sh $PREFIX" \
    "ExecStart=$PREFIX/$NAME --config $PREFIX/config.json" \
    'Restart=always' \
    'RestartSec=2' \
    '' \
    '[Install]' \
    'WantedBy=multi-user.target' > /etc/systemd/system/$NAME.service
  systemctl daemon-reload
  systemctl enable $NAME >/dev/null 2>&1
  if [ "$START" = yes ]; then systemctl restart $NAME; fi
  echo "installed as the systemd service $NAME"
else
  # No systemd (busybox init): a supervisor restarts the agent 2 s after any exit; an
  # init script starts and stops the supervisor.
  printf '%s\n' \
    '#!/bin/sh' \
    '# Keeps camera-agent running; restarts it 2 s after any exit. Before each start,' \
    '# update-check.sh puts the previous agent back if an update keeps failing to start.' \
    "echo \$\$ > \"$PREFIX/supervise.pid\"" \
    '# Outlives the shell that started it (no nohup: not every busybox has it).' \
    "trap '' HUP" \
    "trap 'kill \$child 2>/dev/null; rm -f \"$PREFIX/supervise.pid\"; exit 0' TERM INT" \
    'while :; do' \
    "  /bin/sh \"$PREFIX/update-check.sh\" \"$PREFIX\"" \
    "  \"$PREFIX/$NAME\" --config \"$PREFIX/config.json\" &" \
    '  child=$!' \
    '  wait $child || true' \
    '  sleep 2' \
    'done' > "$PREFIX/supervise.sh"
  chmod 755 "$PREFIX/supervise.sh"
  note_new_dirs /etc/init.d
  mkdir -p /etc/init.d
  printf '%s\n' \
    '#!/bin/sh' \
    "# camera-agent's supervisor; $PREFIX/uninstall.sh removes it." \
    'case "$1" in' \
    '  start)' \
    "    if [ -f \"$PREFIX/supervise.pid\" ] && kill -0 \"\$(cat \"$PREFIX/supervise.pid\")\" 2>/dev/null; then exit 0; fi" \
    "    \"$PREFIX/supervise.sh\" </dev/null >/dev/null 2>&1 &" \
    '    ;;' \
    '  stop)' \
    "    if [ -f \"$PREFIX/supervise.pid\" ]; then kill \"\$(cat \"$PREFIX/supervise.pid\")\" 2>/dev/null || true; fi" \
    '    ;;' \
    '  restart) "$0" stop; sleep 1; "$0" start ;;' \
    '  *) echo "usage: $0 start|stop|restart"; exit 1 ;;' \
    'esac' > /etc/init.d/S99$NAME
  chmod 755 /etc/init.d/S99$NAME
  if [ "$START" = yes ]; then /etc/init.d/S99$NAME restart; fi
  echo "installed with the init script /etc/init.d/S99$NAME (a supervisor restarts the agent)"
fi
if [ ! -f "$PREFIX/.created-dirs" ]; then
  printf '%s' "$created" > "$PREFIX/.created-dirs"
fi
echo "done; edit $PREFIX/config.json if the relay or token is not set yet"
