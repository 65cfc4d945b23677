"""The story of three tiers: a province, its city and one of the city's counties each run a collector on
their own host, mTLS between every two; an agent on a county workstation reports to the county.

A service starts listening on the workstation: the county raises it, and the province sees it through
`tiers incidents` as 市局/城关区, with the county's migration states and hourly rollups beside it. Then the
city's collector is stopped for a while; the county goes on raising incidents (one of them with a rule only
the province has, which came down through the city); the city comes back and everything reaches the
province: nothing lost, nothing twice.

Real test hosts in network namespaces, real collectors and agent, the operators' own commands.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fleet import enroll, log_tail, run_agent, start_collector, stop, wait_until
from testnet import ROOT, ZONE_CATALOG, Host, TestNetwork, require_root_netns

from collector.config import default_pki_dir
from collector.tiers_policy import policy_dir, upstream_rules_dir

pytestmark = pytest.mark.netns

# A rule only the province has: a listener on this port is a high-severity finding.
PROVINCE_PORT = 9300
PROVINCE_RULE = f"""\
title: Listener on the province's watched port
id: 5d0c7c52-6a8e-4c1f-9f7e-3b1d2c0a9300
name: province_watched_port
status: experimental
level: high
description: "A province-wide rule, nothing may listen on port {PROVINCE_PORT}."
author: zonewatch tests
date: 2026-11-28
dedup-by:
  - agent_id
  - local_port
logsource:
  product: zonewatch
  category: listener
detection:
  selection:
    change: opened
    local_port: {PROVINCE_PORT}
  condition: selection
samples:
  match:
    - {{category: listener, agent_id: a, change: opened, protocol: tcp, local_addr: 0.0.0.0,
       local_port: {PROVINCE_PORT}, pid: 1, process: nc, user: root, cmdline: nc}}
  no_match:
    - {{category: listener, agent_id: a, change: opened, protocol: tcp, local_addr: 0.0.0.0,
       local_port: 8080, pid: 1, process: nc, user: root, cmdline: nc}}
"""


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        return con.execute(sql).fetchall()
    except sqlite3.Error:
        return []
    finally:
        con.close()


def cli(host: Host, *args: str) -> Any:
    out = host.python("-m", "collector.cli", *args, "--format", "json").stdout
    return json.loads(out)


def collector_token(host: Host, db: Path) -> str:
    out = host.python(
        "-m", "collector.cli", "tokens", "create", "--db", str(db), "--role", "collector"
    ).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("token ")]
    return line.split(": ", 1)[1].strip()


def enroll_tier(lower: Host, db: Path, upper: Host, upper_db: Path, upstream: str, name: str) -> None:
    """What the two operators do: a token of role collector upstream, `tiers enroll` below."""
    lower.python(
        "-m", "collector.cli", "tiers", "enroll", "--db", str(db), "--upstream", upstream,
        "--token", collector_token(upper, upper_db), "--ca", str(default_pki_dir(upper_db) / "ca.crt"),
        "--name", name,
    )  # fmt: skip


def listen(host: Host, port: int) -> subprocess.Popen[Any]:
    return host.python_popen(
        "-m", "http.server", "--bind", "0.0.0.0", port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_county_incidents_reach_the_province_through_the_city_and_survive_its_outage(tmp_path: Path) -> None:
    require_root_netns(iperf3=False)
    zones = tmp_path / "zones.yaml"
    zones.write_text(ZONE_CATALOG, encoding="utf-8")
    province_rules = tmp_path / "province-rules"
    shutil.copytree(ROOT / "rules", province_rules)
    (province_rules / "province_watched_port.yml").write_text(PROVINCE_RULE, encoding="utf-8")
    dbs = {name: tmp_path / name / "collector.db" for name in ("province", "city", "county")}
    logs = {name: tmp_path / f"{name}.log" for name in (*dbs, "agent")}
    for db in dbs.values():
        db.parent.mkdir()
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text("listener_interval = 1\n", encoding="utf-8")
    procs: dict[str, subprocess.Popen[Any]] = {}
    services: list[subprocess.Popen[Any]] = []
    with TestNetwork() as net:
        hosts = {name: net.add_host(name, "extranet") for name in ("prov", "city", "county", "ws")}
        prov, city, county, ws = hosts["prov"], hosts["city"], hosts["county"], hosts["ws"]
        try:
            procs["province"], prov_at = start_collector(
                prov, dbs["province"], zones, tls=True, log=logs["province"],
                extra=("--rules", str(province_rules)),
            )  # fmt: skip
            city.python("-m", "collector.cli", "init", "--db", str(dbs["city"]))
            enroll_tier(city, dbs["city"], prov, dbs["province"], prov_at, "市局")
            tier = ("--upstream-interval", "1", "--upstream-rollup-interval", "2")
            procs["city"], city_at = start_collector(
                city, dbs["city"], tls=True, log=logs["city"], extra=("--upstream", prov_at, *tier)
            )
            county.python("-m", "collector.cli", "init", "--db", str(dbs["county"]))
            enroll_tier(county, dbs["county"], city, dbs["city"], city_at, "城关区")
            procs["county"], county_at = start_collector(
                county, dbs["county"], tls=True, log=logs["county"], extra=("--upstream", city_at, *tier)
            )
            state = tmp_path / "ws-state"
            enroll(
                ws, county, dbs["county"], county_at, state, "ws-01", department="市公安局", county="城关区"
            )
            procs["agent"] = run_agent(
                ws, state, "ws-01", "--config", str(agent_config), "--cpu-budget", "0", log=logs["agent"]
            )
            wait_until(
                lambda: (
                    query(dbs["county"], "SELECT count(*) FROM agents WHERE hostname = 'ws-01'") == [(1,)]
                ),
                30,
                "the agent at the county",
            )
            time.sleep(3)  # the first listing (present) is in: what opens now is new

            # 1. A service starts listening on the workstation: raised at the county, seen at the province.
            services.append(listen(ws, 8088))

            def at_province(rule: str) -> list[dict[str, Any]]:
                rows = cli(prov, "tiers", "incidents", "--db", str(dbs["province"]), "--status", "all")
                return [r for r in rows if r["rule_id"] in rule_ids(rule) and r["tier"] == "市局/城关区"]

            def rule_ids(rule: str) -> set[str]:
                found = query(dbs["county"], f"SELECT rule_id, rule FROM incidents WHERE rule = '{rule}'")
                return {r for pair in found for r in pair}

            wait_until(
                lambda: at_province("new_listening_service"), 60, "the county's incident at the province"
            )
            (seen,) = at_province("new_listening_service")
            assert seen["hostname"] == "ws-01" and seen["county"] == "城关区" and seen["severity"] == "low"
            tiers = {r["tier"]: r for r in cli(prov, "tiers", "list", "--db", str(dbs["province"]))}
            assert {"(local)", "市局", "市局/城关区"} <= set(tiers)
            assert tiers["市局/城关区"]["low"] >= 1
            wait_until(
                lambda: (
                    query(dbs["province"], "SELECT count(*) FROM tier_migrations WHERE tier = '市局/城关区'")[
                        0
                    ][0]
                    >= 1
                ),
                40,
                "the county's migration states at the province",
            )
            wait_until(
                lambda: (
                    query(dbs["province"], "SELECT count(*) FROM tier_rollups WHERE tier = '市局/城关区'")[0][
                        0
                    ]
                    >= 1
                ),
                40,
                "the county's hourly rollups at the province",
            )

            # The province's own rule came down through the city (collector/tiers_policy.py).
            county_rules = upstream_rules_dir(policy_dir(dbs["county"].parent / "upstream"))
            wait_until(
                lambda: (county_rules / "province_watched_port.yml").exists(),
                30,
                "the province's rule at the county",
            )

            # 2. The city's collector goes away; the county raises more, among them the province's own rule.
            stop(city, procs.pop("city"), logs["city"])
            services.append(listen(ws, PROVINCE_PORT))
            wait_until(
                lambda: rule_ids("province_watched_port"), 40, "the province's rule firing at the county"
            )
            status = cli(county, "tiers", "status", "--db", str(dbs["county"]))
            assert status["name"] == "城关区" and status["upstream"] == city_at
            wait_until(
                lambda: not cli(county, "tiers", "status", "--db", str(dbs["county"]))["connected"],
                20,
                "the county to notice the city is gone",
            )
            time.sleep(3)

            # 3. The city comes back: the backlog reaches the province, each incident once, as the county
            # has it.
            procs["city"], _ = start_collector(
                city, dbs["city"], tls=True, log=logs["city"], extra=("--upstream", prov_at, *tier)
            )

            def same() -> bool:
                county_incidents = query(
                    dbs["county"], "SELECT id, count, status, severity FROM incidents ORDER BY id"
                )
                province_incidents = query(
                    dbs["province"],
                    "SELECT incident_id, count, status, severity FROM tier_incidents"
                    " WHERE tier = '市局/城关区' ORDER BY incident_id",
                )
                return bool(county_incidents) and county_incidents == province_incidents

            wait_until(same, 60, "the province's copy of the county's incidents after the outage")
            (high,) = at_province("province_watched_port")
            assert high["severity"] == "high"
            for lower in ("city", "county"):
                # Every batch each forwarder spooled is stored once upstream: no holes, no repeats.
                (key,) = query(dbs["province" if lower == "city" else "city"],
                               "SELECT id FROM agents WHERE role = 'collector'")[0]  # fmt: skip
                upper = dbs["province" if lower == "city" else "city"]
                (count, top) = query(upper, f"SELECT count(*), max(seq) FROM batches WHERE agent = {key}")[0]
                assert count == top, f"{lower}: {count} batches stored up to seq {top}"
                assert query(upper, f"SELECT * FROM sequence_gaps WHERE agent = {key}") == []
        except BaseException:
            for name, log in logs.items():
                print(log_tail(log), file=sys.stderr)
                del name
            raise
        finally:
            for proc in services:
                proc.terminate()
            for name in ("agent", "county", "city", "province"):
                if name in procs:
                    host = {"agent": ws, "county": county, "city": city, "province": prov}[name]
                    host.stop(procs[name], 20)
