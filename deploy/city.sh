#!/usr/bin/env bash
# City in a box: create (or refresh) .venv, then build a small city of test hosts in network namespaces,
# drive it for about two minutes and write the collector's report. Needs root (network namespaces),
# iproute2, nftables and iperf3. Arguments go to deploy/city.py (--minutes, --out, --lang, --keep).
#   sudo bash deploy/city.sh --minutes 2 --out city-report.html
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$(id -u)" -ne 0 ]; then
    echo "city.sh: needs root to build network namespaces: sudo bash $0 $*" >&2
    exit 2
fi
echo "installing zonewatch into .venv ..." >&2
bash "$repo/deploy/setup-venv.sh"
# Relative --out and --keep stay relative to where the command was typed: no cd here.
exec "$repo/.venv/bin/python" "$repo/deploy/city.py" "$@"
