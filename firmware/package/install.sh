#!/bin/sh
# Installs camera-agent on the camera. POSIX sh; runs under busybox ash.
#   sh install.sh            install to @PREFIX@
#   sh install.sh /other/dir install elsewhere
# An existing config.json (and credentials) are kept, so this also upgrades.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PREFIX=${1:-@PREFIX@}
NAME=camera-agent

echo "camera-agent @VERSION@ for @CAMERA@: installing to $PREFIX"
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
cp "$here/uninstall.sh" "$PREFIX/uninstall.sh"
chmod 755 "$PREFIX/uninstall.sh"

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  cat > /etc/systemd/system/$NAME.service <<UNIT
[Unit]
Description=Camera tunnel agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$PREFIX/$NAME --config $PREFIX/config.json
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable $NAME >/dev/null 2>&1
  systemctl restart $NAME
  echo "installed as the systemd service $NAME"
else
  # No systemd (busybox init): a supervisor that restarts the agent whenever it exits,
  # started from an init script.
  cat > "$PREFIX/supervise.sh" <<SUPERVISE
#!/bin/sh
# Keeps camera-agent running; restarts it 2 s after any exit.
echo \$\$ > "$PREFIX/supervise.pid"
trap 'kill \$child 2>/dev/null; rm -f "$PREFIX/supervise.pid"; exit 0' TERM INT
while :; do
  "$PREFIX/$NAME" --config "$PREFIX/config.json" &
  child=\$!
  wait \$child || true
  sleep 2
done
SUPERVISE
  chmod 755 "$PREFIX/supervise.sh"
  initdir=/etc/init.d
  mkdir -p "$initdir"
  cat > "$initdir/S99$NAME" <<INIT
#!/bin/sh
# Starts and stops camera-agent's supervisor (installed by $PREFIX/uninstall.sh's twin).
case "\$1" in
  start)
    if [ -f "$PREFIX/supervise.pid" ] && kill -0 "\$(cat "$PREFIX/supervise.pid")" 2>/dev/null; then exit 0; fi
    nohup "$PREFIX/supervise.sh" >/dev/null 2>&1 &
    ;;
  stop)
    if [ -f "$PREFIX/supervise.pid" ]; then kill "\$(cat "$PREFIX/supervise.pid")" 2>/dev/null || true; fi
    ;;
  restart) "\$0" stop; sleep 1; "\$0" start ;;
  *) echo "usage: \$0 start|stop|restart"; exit 1 ;;
esac
INIT
  chmod 755 "$initdir/S99$NAME"
  "$initdir/S99$NAME" restart
  echo "installed with the init script $initdir/S99$NAME (a supervisor restarts the agent)"
fi
echo "done; edit $PREFIX/config.json if the relay or token is not set yet"
