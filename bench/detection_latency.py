"""From the packet that crosses a scan threshold to the stored incident: how long?

    .venv/bin/python bench/detection_latency.py [--rounds 20] [--gap 2.5]     (root: test hosts in netns)

A test network of three hosts in network namespaces: a collector (`serve --insecure`, the default rule
pack, a fresh SQLite file), a target running `zonewatch-agent run --interval 1` (the agent window the
target is stated for), and an attacker on the internet subnet. Each round the attacker takes a fresh
source address and sends crafted SYNs (scapy) to 30 ports of the target; the 15th is the threshold
of the default pack's port_scan_vertical rule (Snort 3's medium sensitivity: 15 ports in 90 s). The
round's latency is from the moment that 15th SYN left to the moment the incident for that source is
in the database (polled every 10 ms by a reader, so up to 10 ms late). Rounds start at a random phase of
the agent's window, so the figures cover the whole window.

The reference: the agent's window (1 s) is the floor a window-based design cannot beat, and the
published figures for the same detection are Snort 3's 60-90 s windows and Zeek's 5 min. Last line:

    RESULT p95_s=N p50_s=N target=2
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from fleet import run_agent, start_collector, stop, wait_until  # noqa: E402
from testnet import ZONE_CATALOG, TestNetwork, require_root_netns  # noqa: E402

ATTACKS = ROOT / "tests" / "e2e" / "attacks.py"
THRESHOLD = 15
PORTS = 30


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def stored(db: Path, peer: str) -> bool:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT dedup_fields FROM incidents WHERE rule = 'port_scan_vertical'"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return any(json.loads(fields).get("peer_addr") == peer for (fields,) in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20, help="scans, each from a new source (default 20)")
    parser.add_argument(
        "--gap", type=float, default=2.5, help="seconds between rounds, plus 0-1 s at random (default 2.5)"
    )
    args = parser.parse_args()
    require_root_netns(iperf3=False)
    latencies: list[float] = []
    with tempfile.TemporaryDirectory(prefix="zw-latency-") as tmp, TestNetwork() as net:
        work = Path(tmp)
        db, zones = work / "collector.db", work / "zones.yaml"
        zones.write_text(ZONE_CATALOG, encoding="utf-8")
        central = net.add_host("coll", "extranet")
        target = net.add_host("target", "extranet")
        attacker = net.add_host("atk", "internet")
        collector, listen = start_collector(central, db, zones, log=work / "collector.log")
        log = work / "agent.log"
        agent = run_agent(target, work / "agent", "target", "--insecure", "--collector", listen, log=log)
        try:
            wait_until(lambda: db.exists() and _agents(db) >= 1, 60, "the agent reporting")
            time.sleep(3)
            victim = target.address("extranet")
            for n in range(args.rounds):
                source = f"198.51.100.{100 + n}"
                attacker.run("ip", "addr", "add", f"{source}/32", "dev", "eth0")
                out = attacker.python(
                    str(ATTACKS), "syn-scan", victim, 2000, PORTS, THRESHOLD, "--source", source, timeout=60
                ).stdout
                crossed_ns = json.loads(out.strip().splitlines()[-1])["crossed_ns"]
                deadline = time.monotonic() + 15
                while not stored(db, source) and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen = time.time_ns()
                if not stored(db, source):
                    progress(f"round {n + 1}: no incident for {source} within 15 s")
                    latencies.append(15.0)
                else:
                    latencies.append((seen - crossed_ns) / 1e9)
                    progress(f"round {n + 1}/{args.rounds}: {latencies[-1]:.3f} s")
                # A random phase against the agent's 1 s window: a fixed period would measure one phase only.
                time.sleep(args.gap + random.uniform(0, 1))
        finally:
            stop(target, agent, log)
            central.stop(collector)
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(f"rounds={len(ordered)} min_s={ordered[0]:.3f} p50_s={p50:.3f} p95_s={p95:.3f}", end=" ")
    print(f"max_s={ordered[-1]:.3f}")
    print(
        "reference: agent window 1 s (the floor); Snort 3 port_scan windows 60-90 s; Zeek scan policy 5 min"
    )
    print(f"RESULT p95_s={p95:.3f} p50_s={p50:.3f} target=2")
    return 0


def _agents(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT count(*) FROM agents").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"bench failed: {exc}: {exc.stderr}", file=sys.stderr)
        sys.exit(1)
