#!/usr/bin/env bash
# Quick start: install into .venv, start a collector on 127.0.0.1 with its embedded SQLite
# database, enroll an agent on this host with a one-time token (first run only), let it report
# over mTLS, and show the fleet view until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${ZONEWATCH_PORT:-7390}
state=${ZONEWATCH_STATE:-.zonewatch}
echo "installing zonewatch into .venv ..."
bash deploy/setup-venv.sh
mkdir -p "$state"
db="$state/collector.db"
if [ ! -e "$state/pki/ca.crt" ]; then  # once: the collector's CA and TLS certificate
    .venv/bin/zonewatch-collector init --db "$db" | sed 's/^/  /'
fi
.venv/bin/zonewatch-collector serve --db "$db" --listen "127.0.0.1:$port" \
    --sample-interval 2 2>>"$state/collector.log" &
collector=$!
cleanup() {
    kill "$agent" "$collector" 2>/dev/null || true
    wait "$agent" "$collector" 2>/dev/null || true
    echo "stopped; data kept in $state/ (collector.db, agent/spool.db, *.log)"
}
agent=
trap cleanup EXIT
trap 'exit 0' INT TERM
for _ in $(seq 50); do  # wait until the collector has created its database
    [ -s "$state/collector.db" ] && break
    kill -0 "$collector" 2>/dev/null || { cat "$state/collector.log"; exit 1; }
    sleep 0.2
done
if [ ! -e "$state/agent/enrollment.json" ]; then  # once: a token on the collector, enroll with it
    sleep 0.5  # the ports are bound just after the database is created
    enroll=$(.venv/bin/zonewatch-collector tokens create --db "$db" --collector "127.0.0.1:$port" \
        --department "${ZONEWATCH_DEPARTMENT:-信息中心}" --county "${ZONEWATCH_COUNTY:-市本级}" \
        --role workstation --note quickstart | grep 'zonewatch-agent enroll')
    # shellcheck disable=SC2086  # split the printed command into its words
    set -- $enroll  # zonewatch-agent enroll --collector ... --token ... --ca-fingerprint ...
    shift 2
    .venv/bin/zonewatch-agent enroll "$@" --state-dir "$state/agent" | sed 's/^/  /'
fi
.venv/bin/zonewatch-agent run --state-dir "$state/agent" --interval 2 2>>"$state/agent.log" &
agent=$!
.venv/bin/zonewatch-collector watch --db "$state/collector.db" --since 1m --every 2
