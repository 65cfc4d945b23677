"""The story security staff tell: five extranet hosts run agents; an attacker on the internet scans one
host's ports, sweeps one port across the hosts and hammers SSH, while the hosts go on with ordinary
work (a web service with a client that reconnects all the time, an iperf3 transfer). Every attack is
raised once, within seconds, by the default rule pack; the ordinary traffic raises nothing.

Real packets between test hosts in network namespaces: crafted SYNs from scapy, real TCP connections.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fleet import log_tail, run_agent, start_collector, stop, wait_until
from testnet import ZONE_CATALOG, Host, TestNetwork, require_root_netns

pytestmark = pytest.mark.netns

ATTACKS = Path(__file__).resolve().parent / "attacks.py"
TARGETS = 5
WEB_PORT, SSH_PORT, IPERF_PORT = 8080, 22, 5201
# The default pack's thresholds these attacks cross (rules/*.yml).
SCAN_PORTS_THRESHOLD = 15


def incidents(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        rows = con.execute("SELECT * FROM incidents WHERE rule NOT LIKE 'zonewatch.%' ORDER BY id").fetchall()
        return [dict(r) for r in rows]
    except sqlite3.Error:
        return []
    finally:
        con.close()


def of_rule(db: Path, rule: str) -> list[dict[str, Any]]:
    return [i for i in incidents(db) if i["rule"] == rule]


def first_seen_wall_ns(db: Path, rule: str, timeout: float) -> int:
    """Poll until an incident of ``rule`` is stored; the wall clock when it was seen (50 ms polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if of_rule(db, rule):
            return time.time_ns()
        time.sleep(0.05)
    raise AssertionError(f"no {rule} incident within {timeout:g} s; incidents: {incidents(db)}")


def attack(host: Host, *args: object) -> dict[str, Any]:
    out = host.python(str(ATTACKS), *args, timeout=60).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_scans_and_brute_force_are_raised_once_and_ordinary_traffic_is_not(tmp_path: Path) -> None:
    require_root_netns()
    db = tmp_path / "collector.db"
    zones = tmp_path / "zones.yaml"
    zones.write_text(ZONE_CATALOG, encoding="utf-8")
    collector_log = tmp_path / "collector.log"
    with TestNetwork() as net:
        central = net.add_host("coll", "extranet")
        targets = [net.add_host(f"t{i}", "extranet") for i in range(1, TARGETS + 1)]
        attacker = net.add_host("atk", "internet")
        web, client, iperf_server, iperf_client = targets[0], targets[1], targets[3], targets[2]
        # Services start before the agents: they are there already, not new listeners.
        services = [
            web.python_popen("-m", "http.server", "--bind", "::", WEB_PORT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL),
            web.python_popen(str(ATTACKS), "serve", SSH_PORT, stdout=subprocess.DEVNULL),
            iperf_server.popen("iperf3", "-s", "-p", IPERF_PORT, stdout=subprocess.DEVNULL),
        ]  # fmt: skip
        wait_until(lambda: web.run("ss", "-Hltn").stdout.count("LISTEN") >= 2, 15, "the services")
        collector, listen = start_collector(central, db, zones, log=collector_log)
        agents = {}
        for host in targets:
            log = tmp_path / f"{host.name}.log"
            agents[host.name] = (
                run_agent(
                    host, tmp_path / host.name, host.name, "--insecure", "--collector", listen, log=log
                ),
                log,
            )
        try:
            wait_until(
                lambda: _reporting(db) == (TARGETS, 3), 60, "every agent reporting, the listeners listed"
            )
            # Ordinary work for the rest of the test: a steady transfer and a client that reconnects.
            ordinary = [
                iperf_client.popen("iperf3", "-c", iperf_server.address("extranet"), "-p", IPERF_PORT,
                                   "-t", 120, "-b", "20M", stdout=subprocess.DEVNULL),
                client.python_popen(str(ATTACKS), "clients", web.address("extranet"), WEB_PORT, 120,
                                    stdout=subprocess.DEVNULL),
            ]  # fmt: skip
            time.sleep(3)

            # 1. A SYN scan of 100 ports of one host: one port-scan incident, within 2 s of the 15th port.
            scan = attack(attacker, "syn-scan", web.address("extranet"), 1000, 100, SCAN_PORTS_THRESHOLD)
            seen = first_seen_wall_ns(db, "port_scan_vertical", 10)
            scan_latency_s = (seen - scan["crossed_ns"]) / 1e9
            time.sleep(3)  # later windows of the same scan must update it, not add another
            (scan_incident,) = of_rule(db, "port_scan_vertical")
            assert json.loads(scan_incident["dedup_fields"])["peer_addr"] == attacker.address("internet")
            assert scan_latency_s <= 2.0, f"port scan raised {scan_latency_s:.2f} s after the threshold"
            print(f"port scan raised {scan_latency_s:.3f} s after its 15th port")

            # 2. One port on every monitored host: its own incident, the vertical one untouched.
            attack(attacker, "sweep", 445, *(t.address("extranet") for t in targets))
            first_seen_wall_ns(db, "port_scan_horizontal", 10)
            assert len(of_rule(db, "port_scan_vertical")) == 1

            # 3. Twenty connections to SSH within seconds: brute force.
            attack(attacker, "connect", web.address("extranet"), SSH_PORT, 20)
            first_seen_wall_ns(db, "admin_brute_force", 10)

            time.sleep(3)
            raised = incidents(db)
            attacker_addr = attacker.address("internet")
            for incident in raised:
                events = json.loads(incident["evidence"])["events"]
                peers = {e.get("peer_addr") for e in events}
                assert peers == {attacker_addr}, f"an incident not about the attacker: {incident}"
            assert {i["rule"] for i in raised} <= {
                "port_scan_vertical",
                "port_scan_horizontal",
                "admin_brute_force",
                "admin_access_from_non_admin_zone",
            }, [i["title"] for i in raised]
            for proc in ordinary:
                assert proc.poll() is None, "the ordinary traffic stopped early"
            print("\n".join(f"{i['rule']}: {i['title']} (count {i['count']})" for i in raised))
        except BaseException:
            print(
                "\n".join(log_tail(log) for _, log in agents.values()),
                log_tail(collector_log),
                file=sys.stderr,
            )
            raise
        finally:
            for host, (proc, log) in zip(targets, agents.values(), strict=True):
                stop(host, proc, log)
            central.stop(collector)
            for proc in services:
                proc.kill()


def _reporting(db: Path) -> tuple[int, int]:
    """(agents whose batches are stored, listening sockets listed): the services' three sockets."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (agents,) = con.execute("SELECT count(DISTINCT agent) FROM batches").fetchone()
            (listeners,) = con.execute(
                "SELECT count(*) FROM other_facts WHERE kind = 'listener_change'"
            ).fetchone()
            return int(agents), int(listeners)
        finally:
            con.close()
    except sqlite3.Error:
        return 0, 0
