#!/bin/sh
# Install the zonewatch agent from this offline bundle (made by `zonewatch-collector bundle`).
#
#   sudo sh install.sh --token-file FILE      # the token from `zonewatch-collector tokens create`
#   sudo ZONEWATCH_TOKEN=zwt_... sh install.sh # the same, kept out of the process list
#   sudo sh install.sh --token zwt_...        # the same, but every user can see it in `ps` meanwhile
#   sudo sh install.sh                        # a re-run, or a bundle built with --token
#
# Never touches the network except to enroll with the collector: every wheel comes from wheels/,
# checked against SHA256SUMS first. Safe to run again: it rebuilds the venv and keeps the
# configuration, the enrollment and the spool. What it creates is recorded in
# /opt/zonewatch-agent/install.record, so uninstall.sh removes exactly that.
set -eu
umask 022

PREFIX=/opt/zonewatch-agent
CONF_DIR=/etc/zonewatch
STATE_DIR=/var/lib/zonewatch-agent
UNIT=/etc/systemd/system/zonewatch-agent.service
SERVICE_USER=zonewatch-agent
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}
step() { echo "install.sh: $*"; }

usage() {
    cat <<'USAGE'
usage: sh install.sh [--token TOKEN | --token-file FILE]

Installs the zonewatch agent: a system user, a venv in /opt/zonewatch-agent (wheels from this
bundle only), /etc/zonewatch/agent.toml, /var/lib/zonewatch-agent, the hardened systemd unit
zonewatch-agent.service; enrolls with the one-time token and starts the agent when systemd runs.
The token may also come from $ZONEWATCH_TOKEN or a file named token in the bundle (deleted after use).
USAGE
}

TOKEN=${ZONEWATCH_TOKEN:-}
while [ $# -gt 0 ]; do
    case $1 in
        --token) [ $# -ge 2 ] || die "--token needs a value"; TOKEN=$2; shift 2 ;;
        --token=*) TOKEN=${1#--token=}; shift ;;
        --token-file) [ $# -ge 2 ] || die "--token-file needs a file"; [ -r "$2" ] || die "cannot read $2"
            TOKEN=$(cat "$2"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root: sudo sh install.sh ..."
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"

# 1. Integrity first: nothing of the bundle is used before it is checked.
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"
[ -f SHA256SUMS ] || die "no SHA256SUMS in $HERE: not a complete bundle"
bad=$(sha256sum --check --strict --quiet SHA256SUMS 2>&1) ||
    die "the bundle is damaged or was altered, copy it again: $(echo "$bad" | head -n 1)"
# pip takes every wheel in wheels/: one that SHA256SUMS does not list must not be there.
for wheel in wheels/*; do
    cut -c 67- SHA256SUMS | grep -qxF "$wheel" ||
        die "$wheel is not listed in SHA256SUMS: remove it or copy the bundle again"
done
. ./bundle.env
step "bundle $VERSION for $COLLECTOR, Python $PYTHON_VERSION on $ARCH: checksums verified"

# 2. This host: the architecture and the Python the wheels were built for.
machine=$(uname -m)
[ "$machine" = "$ARCH" ] ||
    die "this bundle is for $ARCH, this host is $machine: build one with --platform for $machine"
command -v python3 >/dev/null || die "python3 not found: install Python >= 3.11 from the OS media"
version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "python3 does not run"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 is $version; zonewatch needs Python >= 3.11"
[ "$version" = "$PYTHON_VERSION" ] ||
    die "the wheels are for Python $PYTHON_VERSION, this host has $version (bundle --python-version $version)"
python3 -c 'import venv' 2>/dev/null || die "python3 has no venv module: install the OS package python3-venv"
command -v setpriv >/dev/null || die "setpriv not found (util-linux): needed to enroll as $SERVICE_USER"
NOLOGIN=$(command -v nologin || true)
[ -n "$NOLOGIN" ] || NOLOGIN=/bin/false

# 3. The record of what this install created (kept from an earlier run), so uninstall removes exactly that.
# It is written out whenever the script ends, a failed run included.
RECORD=$(mktemp)
save_record() {
    if [ -d "$PREFIX" ]; then
        install -m 0644 "$RECORD" "$PREFIX/install.record"
    fi
    rm -f "$RECORD"
}
trap save_record EXIT
if [ -f "$PREFIX/install.record" ]; then
    cp "$PREFIX/install.record" "$RECORD"
fi
record() { grep -qxF "$1" "$RECORD" || echo "$1" >>"$RECORD"; }
# mkdir -p that records each directory it had to create (and not the ones that were there).
make_dir() {
    missing=""
    dir=$1
    while [ ! -d "$dir" ]; do
        missing="$dir $missing"
        dir=$(dirname "$dir")
    done
    for dir in $missing; do
        mkdir -m 0755 "$dir"
        record "dir $dir"
    done
}

# 4. The system user: no home, no login shell, no password.
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    # A group left behind (an uninstall whose userdel ran but groupdel failed) makes --user-group fail.
    group=--user-group
    if getent group "$SERVICE_USER" >/dev/null 2>&1; then
        group="-g $SERVICE_USER"
    fi
    # shellcheck disable=SC2086 # $group is two words on purpose
    useradd --system $group --no-create-home --home-dir /nonexistent --shell "$NOLOGIN" \
        --comment "zonewatch agent" "$SERVICE_USER" || die "useradd $SERVICE_USER failed"
    step "created system user $SERVICE_USER"
fi

# 5. The venv, from the bundle's wheels only (pip runs from its own wheel: no ensurepip needed).
make_dir "$PREFIX"
if [ -d /run/systemd/system ] && systemctl --quiet is-active zonewatch-agent.service; then
    step "stopping the running agent for the upgrade"
    systemctl stop zonewatch-agent.service
fi
PIP_WHEEL=$(ls wheels/pip-*.whl 2>/dev/null | head -n 1)
[ -n "$PIP_WHEEL" ] || die "no pip wheel in wheels/: not a complete bundle"
step "creating the venv in $PREFIX/venv"
python3 -m venv --clear --without-pip "$PREFIX/venv" || die "python3 -m venv failed"
pip_install() {
    # A clean environment: no pip.conf, no index, no proxy of the host can add a source.
    env -i PATH="$PATH" PIP_CONFIG_FILE=/dev/null "$PREFIX/venv/bin/python" "$HERE/$PIP_WHEEL/pip" install \
        --no-index --find-links "$HERE/wheels" --only-binary=:all: --no-cache-dir \
        --disable-pip-version-check --no-warn-script-location --quiet "$@"
}
step "installing the wheels (offline)"
pip_install --requirement requirements.txt ||
    die "pip could not install the agent's dependencies from wheels/"
pip_install --no-deps wheels/zonewatch-*.whl || die "pip could not install the zonewatch wheel"
cp uninstall.sh "$PREFIX/uninstall.sh"
chmod 0755 "$PREFIX/uninstall.sh"
cp VERSION "$PREFIX/VERSION"

# 6. Configuration (an existing one is the admin's: kept) and state (the service user's only).
make_dir "$CONF_DIR"
if [ -f "$CONF_DIR/agent.toml" ]; then
    step "keeping the existing $CONF_DIR/agent.toml"
else
    install -m 0644 agent.toml "$CONF_DIR/agent.toml"
    record "file $CONF_DIR/agent.toml"
fi
make_dir "$(dirname "$STATE_DIR")"
[ -d "$STATE_DIR" ] || record "dir $STATE_DIR"
install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"

# 7. Enrollment, as the service user, so the key is its own from the start.
if [ -f "$STATE_DIR/enrollment.json" ] && [ -f "$STATE_DIR/tls/agent.crt" ]; then
    step "already enrolled (state in $STATE_DIR): enrollment skipped"
    rm -f token # an embedded token is a secret that is not needed any more
else
    if [ -z "$TOKEN" ] && [ -f token ]; then
        TOKEN=$(cat token)
    fi
    [ -n "$TOKEN" ] ||
        die "no enrollment token: sh install.sh --token zwt_... (zonewatch-collector tokens create)"
    FINGERPRINT=$(python3 -c 'import hashlib, ssl, sys
print("SHA256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(sys.argv[1]).read())).hexdigest())' ca.pem) ||
        die "cannot read the CA certificate ca.pem"
    step "enrolling with $COLLECTOR (CA $FINGERPRINT)"
    # The token goes in the environment (setpriv keeps it), not on a command line every user can list.
    ZONEWATCH_TOKEN=$TOKEN setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --init-groups -- \
        "$PREFIX/venv/bin/zonewatch-agent" enroll --config "$CONF_DIR/agent.toml" --collector "$COLLECTOR" \
        --enroll-port "$ENROLL_PORT" --ca-fingerprint "$FINGERPRINT" --state-dir "$STATE_DIR" ||
        die "enrollment failed (the line above says why); fix it and run install.sh again"
    # A token on a USB stick is a secret: used once, it goes.
    rm -f token
fi

# 8. The unit: started only where systemd runs; otherwise say how to start the agent.
make_dir "$(dirname "$UNIT")"
[ -f "$UNIT" ] || record "file $UNIT"
install -m 0644 zonewatch-agent.service "$UNIT"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable zonewatch-agent.service
    systemctl restart zonewatch-agent.service
    step "zonewatch-agent.service enabled and started: systemctl status zonewatch-agent"
else
    caps=-all,+net_raw,+net_admin
    step "systemd is not running here: the unit is installed but not started; start the agent as it would:"
    step "  setpriv --reuid=$SERVICE_USER --regid=$SERVICE_USER --init-groups \\"
    step "    --inh-caps=$caps --ambient-caps=$caps \\"
    step "    --bounding-set=$caps --no-new-privs env MALLOC_ARENA_MAX=2 \\"
    step "    $PREFIX/venv/bin/zonewatch-agent run --config $CONF_DIR/agent.toml"
fi
step "done: zonewatch agent $VERSION installed (uninstall: sh $PREFIX/uninstall.sh)"
