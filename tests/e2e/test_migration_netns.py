"""The migration story on real hosts: one host only on the dedicated network, one on both, one that
left it; the one that left talks to the dedicated network again and is regressed, its program named;
an exempt host is not flagged until its exemption expires."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_json, run_cli
from fleet import log_tail, run_agent, start_collector, stop, wait_until
from testnet import SUBNETS, TestNetwork, require_root_netns

pytestmark = pytest.mark.netns

QUIET_S = 6
LEGACY_CLIENT = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for _ in range(30):  # 15 s of traffic: it stays regressed while the test reads the evidence
    conn.sendall(b"x" * 50_000)
    time.sleep(0.5)
time.sleep(30)
"""
SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = server.accept()
while conn.recv(65536):
    pass
"""


def catalog(collector_address: str) -> str:
    """The test network's zones, and the collector's own address as a zone of its own: reporting to
    the collector is monitoring, not use of the extranet."""
    return f"""\
zones:
  - name: 市级横向外网
    kind: extranet
    direction: horizontal
    cidrs: [{SUBNETS["extranet"][0]}, "{SUBNETS["extranet"][1]}"]
  - name: 公安专网
    kind: dedicated
    department: 市公安局
    cidrs: [{SUBNETS["dedicated"][0]}, "{SUBNETS["dedicated"][1]}"]
  - name: 监控
    kind: local
    cidrs: [{collector_address}/32]
"""


def states(db: Path) -> dict[str, str]:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT a.hostname, m.state FROM migration_states AS m JOIN agents AS a ON a.id = m.agent"
                " WHERE m.network = '公安专网'"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return {}
    return dict(rows)


def test_states_regression_blockers_and_exemption(tmp_path: Path) -> None:
    require_root_netns()
    db, zones, log = tmp_path / "collector.db", tmp_path / "zones.yaml", tmp_path / "collector.log"
    config = tmp_path / "agent.toml"
    # Flows reported every 3 s while they run, 2 s after they go quiet: blockers show up at once.
    config.write_text(
        'flow_idle_timeout = 2\nflow_active_timeout = 3\n[labels]\ndepartment = "市公安局"\n',
        encoding="utf-8",
    )
    with TestNetwork() as net:
        central = net.add_host("coll", "extranet")
        zones.write_text(catalog(central.addr4["extranet"]), encoding="utf-8")
        hosts = {
            "ga-ded-01": net.add_host("ded", "dedicated"),
            "ga-both-01": net.add_host("both", "extranet", "dedicated"),
            "ga-ext-01": net.add_host("ext", "extranet"),
        }
        peer = net.add_host("pded", "dedicated")
        collector, listen = start_collector(
            central, db, zones, log=log,
            extra=("--migration-quiet", f"{QUIET_S}s", "--migration-interval", "1"),
        )  # fmt: skip
        agents: dict[str, Any] = {}
        for name, host in hosts.items():
            agents[name] = run_agent(
                host, tmp_path / name, name, "--insecure", "--collector", listen, "--config", str(config),
                log=tmp_path / f"{name}.log",
            )  # fmt: skip
        expected = {"ga-ded-01": "not_started", "ga-both-01": "dual_homed", "ga-ext-01": "migrated"}
        wait_until(lambda: states(db) == expected, timeout=QUIET_S + 40,
                   what=f"states {expected} (have {states(db)})")  # fmt: skip

        # Evidence an admin reads: the dual-homed host's addresses on both networks.
        host_view = run_cli("zonewatch-collector", "migration", "host", "ga-both-01", "--db", str(db)).stdout
        both = hosts["ga-both-01"]
        assert "dual_homed" in host_view
        assert both.addr4["dedicated"] in host_view and both.addr4["extranet"] in host_view
        by_department = json.loads(
            run_cli("zonewatch-collector", "migration", "--db", str(db), "--format", "json").stdout
        )
        (group,) = by_department["groups"]
        assert (group["group"], group["not_started"], group["dual_homed"], group["migrated"]) == (
            "市公安局", 1, 1, 1,
        )  # fmt: skip

        # The migrated host talks to the dedicated network again: regressed within a reporting interval.
        server = peer.addr4["dedicated"]
        peer.python_popen("-c", SINK, server, "1521")
        time.sleep(0.5)
        client = tmp_path / "legacy_billing.py"
        client.write_text(LEGACY_CLIENT, encoding="utf-8")
        started = time.monotonic()
        hosts["ga-ext-01"].python_popen(str(client), server, "1521")
        wait_until(lambda: states(db).get("ga-ext-01") == "regressed", timeout=15, what="the regression")
        regressed_after = time.monotonic() - started
        # Agent interval 1 s, decided every 1 s: within a few seconds of the first packet.
        assert regressed_after < 4, f"regressed only after {regressed_after:.1f} s"
        regressed = cli_json("zonewatch-collector", "migration", "--db", str(db), "--state", "regressed")
        assert [r["hostname"] for r in regressed] == ["ga-ext-01"]

        # The blocker is named once its flow is reported (every 3 s while it runs).
        def blocker() -> dict[str, Any] | None:
            rows = cli_json("zonewatch-collector", "migration", "host", "ga-ext-01", "--db", str(db))
            found = [b for r in rows for b in r["evidence"]["blockers"] if b["remote_port"] == 1521]
            return found[0] if found else None

        wait_until(lambda: blocker() is not None, timeout=30, what="the blocker in the evidence")
        found = blocker()
        assert found is not None and "python" in found["process"] and found["remote_addr"] == server
        assert "legacy_billing.py" in found["cmdline"]

        # An exempt host is not flagged until its exemption expires.
        run_cli(
            "zonewatch-collector", "migration", "exempt", "ga-ded-01", "--db", str(db),
            "--network", "公安专网", "--reason", "户籍系统 not yet on the extranet", "--approved-by", "张三",
            "--reference", "OA-2026-118", "--until", "8s",
        )  # fmt: skip
        wait_until(lambda: states(db).get("ga-ded-01") == "exempt", timeout=10, what="the exemption")
        wait_until(lambda: states(db).get("ga-ded-01") == "not_started", timeout=20, what="the expiry")
        history = cli_json("zonewatch-collector", "migration", "--db", str(db), "--history", "--since", "1d")
        assert (
            sum(history[-1][s] for s in ("not_started", "dual_homed", "migrated", "regressed", "exempt")) == 3
        )
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            changes = con.execute(
                "SELECT a.hostname, t.from_state, t.to_state FROM migration_transitions AS t"
                " JOIN agents AS a ON a.id = t.agent ORDER BY t.id"
            ).fetchall()
        finally:
            con.close()
        # Every change is kept, with its time and evidence: the history and what rules match.
        assert ("ga-ext-01", "migrated", "regressed") in changes
        assert ("ga-ded-01", "not_started", "exempt") in changes and (
            "ga-ded-01",
            "exempt",
            "not_started",
        ) in changes

        for name, agent in agents.items():
            stop(hosts[name], agent, tmp_path / f"{name}.log")
        stop(central, collector, log)
    assert "Traceback" not in log_tail(log, 400)
