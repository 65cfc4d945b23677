#!/bin/sh
# Remove the zonewatch agent that install.sh installed: the service, the venv, the configuration,
# the state (key, certificate, spool), the system user and group, and the directories install.sh
# had to create. Nothing is left behind. Run as root:
#
#   sudo sh /opt/zonewatch-agent/uninstall.sh
#
# The collector still knows the agent: `zonewatch-collector agents revoke ID` there retires it.
set -eu

PREFIX=/opt/zonewatch-agent
CONF_DIR=/etc/zonewatch
STATE_DIR=/var/lib/zonewatch-agent
UNIT=/etc/systemd/system/zonewatch-agent.service
SERVICE_USER=zonewatch-agent
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

die() {
    echo "uninstall.sh: error: $*" >&2
    exit 1
}
step() { echo "uninstall.sh: $*"; }

case ${1:-} in
    "") ;;
    -h | --help) sed -n '2,8p' "$0" | cut -c 3-; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root: sudo sh uninstall.sh"

if [ -d /run/systemd/system ] && [ -f "$UNIT" ]; then
    systemctl disable --now zonewatch-agent.service >/dev/null 2>&1 || true
    step "zonewatch-agent.service stopped and disabled"
fi
if id "$SERVICE_USER" >/dev/null 2>&1; then
    running=$(pgrep -u "$SERVICE_USER" | tr '\n' ' ' || true)
    [ -z "$running" ] || die "the agent still runs (pid ${running% }): stop it, then run uninstall.sh again"
fi

# Read before the prefix goes: the directories install.sh created.
created=""
if [ -f "$PREFIX/install.record" ]; then
    created=$(sed -n 's/^dir //p' "$PREFIX/install.record" | sort -r)
fi

rm -f "$UNIT"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed zonewatch-agent.service >/dev/null 2>&1 || true
fi
# A stopped agent removes its nftables table itself; one that was killed leaves it behind.
if command -v nft >/dev/null 2>&1; then
    nft delete table inet zonewatch >/dev/null 2>&1 || true
fi
rm -f "$CONF_DIR/agent.toml"
rm -rf "$STATE_DIR" "$PREFIX"
step "removed $PREFIX, $STATE_DIR, $CONF_DIR/agent.toml and $UNIT"

# Deepest first, and only when empty: something else may have moved in since. Before userdel: if
# that fails, the record (gone with $PREFIX) is not needed by a second run to remove them.
for dir in $created; do
    rmdir "$dir" 2>/dev/null || true
done

if id "$SERVICE_USER" >/dev/null 2>&1; then
    userdel "$SERVICE_USER" || die "userdel $SERVICE_USER failed"
fi
if getent group "$SERVICE_USER" >/dev/null 2>&1; then
    groupdel "$SERVICE_USER" || die "groupdel $SERVICE_USER failed"
fi
step "removed user and group $SERVICE_USER"
step "done: the zonewatch agent is uninstalled"
