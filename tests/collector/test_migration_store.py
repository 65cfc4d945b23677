"""Migration states in a real database: evidence from inventory and traffic, transitions kept,
exemptions checked, only hosts with news or a deadline decided again."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import cli_json, run_cli

from collector.errors import QueryError
from collector.migration import MigrationPolicy
from collector.model import AgentHello, HostLabels
from collector.store import migration
from collector.store.writer import Writer

NOW = 1_800_000_000_000
MIN = 60_000
POLICY = MigrationPolicy(quiet_ms=10 * MIN, stale_ms=60 * MIN)
CATALOG = [
    ("市级横向外网", "extranet", "horizontal", "", "10.250.1.0/24, fd00:250:1::/64", 0),
    ("公安专网", "dedicated", "", "市公安局", "10.250.2.0/24, fd00:250:2::/64", 0),
    ("人社专网", "dedicated", "", "市人社局", "10.250.3.0/24", 0),
]


@pytest.fixture
def fleet(db: sqlite3.Connection) -> Writer:
    writer = Writer(db)
    writer.store_catalog(CATALOG, "v1", NOW - 60 * MIN)
    for agent_id, department in (("only-ded", "市公安局"), ("both", "市公安局"), ("ext-only", "市公安局")):
        labels = HostLabels(department, "高新区", "", "")
        writer.register(AgentHello(agent_id, agent_id, "t", labels, "", 0), NOW - 60 * MIN)
    return writer


def key(db: sqlite3.Connection, agent_id: str) -> int:
    return int(db.execute("SELECT id FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()[0])


def address(db: sqlite3.Connection, agent_id: str, interface: str, cidr: str) -> None:
    db.execute("INSERT INTO host_addresses VALUES (?, ?, ?, ?)", (key(db, agent_id), interface, cidr, NOW))


def traffic(db: sqlite3.Connection, agent_id: str, zone: str, time_ms: int, count: int = 1000) -> None:
    db.execute(
        "INSERT INTO zone_traffic (agent, seq, time_ms, zone, interface, bytes_in, bytes_out, packets_in,"
        " packets_out, window_ms, method, sampling_rate)"
        " VALUES (?, 1, ?, ?, '', ?, 0, 1, 0, 10000, 'nftables', 1)",
        (key(db, agent_id), time_ms, zone, count),
    )


def seen(db: sqlite3.Connection, time_ms: int) -> None:
    db.execute("UPDATE agents SET last_seen_ms = ?", (time_ms,))


def states(db: sqlite3.Connection) -> dict[tuple[str, str], str]:
    return {(r.hostname, r.network): r.state for r in migration.states(db)}


def test_three_hosts_three_states_then_a_regression_with_its_evidence(
    db: sqlite3.Connection, fleet: Writer
) -> None:
    address(db, "only-ded", "eth0", "10.250.2.10/24")
    address(db, "both", "eth0", "10.250.1.11/24")
    address(db, "both", "eth1", "10.250.2.11/24")
    address(db, "ext-only", "eth0", "10.250.1.12/24")
    seen(db, NOW)
    migration.evaluate(db, NOW, POLICY)
    assert states(db) == {
        ("only-ded", "公安专网"): "not_started",
        ("both", "公安专网"): "dual_homed",
        ("ext-only", "公安专网"): "migrated",  # watched for an hour, the quiet period is 10 min
    }
    # Nothing new: nothing decided again, no transition.
    assert migration.evaluate(db, NOW + 1000, POLICY).agents == 0
    # The migrated host talks to the dedicated network again.
    traffic(db, "ext-only", "公安专网", NOW + 5000)
    seen(db, NOW + 5000)
    report = migration.evaluate(db, NOW + 6000, POLICY)
    assert report.agents == 1 and report.transitions == 1
    (row,) = [r for r in migration.states(db) if r.hostname == "ext-only"]
    assert row.state == "regressed" and row.since_ms == NOW + 6000
    assert row.evidence["dedicated"]["bytes"] == 1000
    assert row.evidence["dedicated"]["last_traffic_ms"] == NOW + 5000
    history = migration.transitions(db, since_ms=0, until_ms=NOW + 10**6)
    assert [(t["hostname"], t["from_state"], t["to_state"]) for t in history][-1] == (
        "ext-only",
        "migrated",
        "regressed",
    )
    # Quiet for a whole period again: migrated, decided by the deadline alone.
    seen(db, NOW + 11 * MIN)
    migration.evaluate(db, NOW + 5000 + 10 * MIN + 1, POLICY)
    assert states(db)[("ext-only", "公安专网")] == "migrated"


def test_blockers_name_the_processes_still_using_the_network(db: sqlite3.Connection, fleet: Writer) -> None:
    address(db, "both", "eth0", "10.250.1.11/24")
    traffic(db, "both", "公安专网", NOW - MIN, 5000)
    db.execute(
        "INSERT INTO flows (agent, seq, time_ms, ip_protocol, local_addr, local_port, remote_addr,"
        " remote_port, interface, bytes_out, bytes_in, packets_out, packets_in, start_ms, end_ms,"
        " tcp_flags, remote_zone, initiated_locally, pid, process, user, cmdline)"
        " VALUES (?, 1, ?, 6, '10.250.1.11', 40000,"
        " '10.250.2.20', 1521, 'eth0', 4000, 1000, 4, 2, ?, ?, 24, '公安专网', 1, 4242, 'java', 'app',"
        " 'java -jar legacy-billing.jar')",
        (key(db, "both"), NOW - MIN, NOW - 2 * MIN, NOW - MIN),
    )
    seen(db, NOW)
    migration.evaluate(db, NOW, POLICY)
    (row,) = [r for r in migration.states(db) if r.hostname == "both"]
    assert row.state == "dual_homed"
    (blocker,) = row.evidence["blockers"]
    assert (blocker["process"], blocker["user"], blocker["remote_addr"], blocker["remote_port"]) == (
        "java",
        "app",
        "10.250.2.20",
        1521,
    )
    assert blocker["bytes"] == 5000 and "legacy-billing" in blocker["cmdline"]


def test_exemptions_are_checked_and_expire(db: sqlite3.Connection, fleet: Writer) -> None:
    address(db, "only-ded", "eth0", "10.250.2.10/24")
    seen(db, NOW)
    agent = key(db, "only-ded")
    with pytest.raises(QueryError, match="expiry must be in the future"):
        migration.exempt(
            db, agent, "公安专网", reason="r", approved_by="a", reference="", until_ms=NOW, now_ms=NOW
        )
    with pytest.raises(QueryError, match="no dedicated network named '外网'"):
        migration.exempt(
            db, agent, "外网", reason="r", approved_by="a", reference="", until_ms=NOW + 1, now_ms=NOW
        )
    with pytest.raises(QueryError, match="--approved-by"):
        migration.exempt(
            db, agent, "公安专网", reason="r", approved_by=" ", reference="", until_ms=NOW + 1, now_ms=NOW
        )
    migration.exempt(
        db, agent, "公安专网", reason="legacy billing", approved_by="张三", reference="OA-118",
        until_ms=NOW + MIN, now_ms=NOW,
    )  # fmt: skip
    with pytest.raises(QueryError, match="already covers"):
        migration.exempt(
            db, agent, "公安专网", reason="r", approved_by="a", reference="", until_ms=NOW + 5, now_ms=NOW
        )
    migration.evaluate(db, NOW, POLICY)
    assert states(db)[("only-ded", "公安专网")] == "exempt"
    seen(db, NOW + MIN)
    migration.evaluate(db, NOW + MIN + 1, POLICY)  # the exemption's expiry is a deadline: decided again
    assert states(db)[("only-ded", "公安专网")] == "not_started"
    assert db.execute("SELECT count(*) FROM migration_exemptions").fetchone() == (1,)  # nothing else changed


def test_the_cli_shows_progress_by_department_and_one_host(
    path: Path, db: sqlite3.Connection, fleet: Writer
) -> None:
    address(db, "only-ded", "eth0", "10.250.2.10/24")
    address(db, "both", "eth0", "10.250.1.11/24")
    address(db, "both", "eth1", "10.250.2.11/24")
    seen(db, NOW)
    migration.evaluate(db, NOW, POLICY)
    report = json.loads(
        run_cli("zonewatch-collector", "migration", "--db", str(path), "--format", "json").stdout
    )
    (group,) = report["groups"]
    assert group["group"] == "市公安局" and group["pairs"] == 3
    assert (group["not_started"], group["dual_homed"], group["migrated"]) == (1, 1, 1)
    assert group["percent_migrated"] == pytest.approx(33.3)
    table = run_cli("zonewatch-collector", "migration", "--db", str(path), "--by", "network").stdout
    assert "公安专网" in table
    listed = cli_json("zonewatch-collector", "migration", "--db", str(path), "--state", "dual_homed")
    assert [r["hostname"] for r in listed] == ["both"]
    host = run_cli("zonewatch-collector", "migration", "host", "both", "--db", str(path)).stdout
    assert "dual_homed" in host and "eth1 10.250.2.11/24" in host
    bad = run_cli("zonewatch-collector", "migration", "host", "nobody", "--db", str(path), check=False)
    assert bad.returncode == 2 and "nobody" in bad.stderr
    past = run_cli(
        "zonewatch-collector", "migration", "exempt", "both", "--db", str(path), "--network", "公安专网",
        "--reason", "r", "--approved-by", "a", "--until", "2020-01-01", check=False,
    )  # fmt: skip
    assert past.returncode == 2 and "in the future" in past.stderr
    ok = run_cli(
        "zonewatch-collector", "migration", "exempt", "both", "--db", str(path), "--network", "公安专网",
        "--reason", "legacy billing", "--approved-by", "张三", "--reference", "OA-118", "--until", "30d",
    )  # fmt: skip
    assert "may stay on 公安专网" in ok.stdout
    run_cli(
        "zonewatch-collector", "migration", "unexempt", "both", "--db", str(path), "--network", "公安专网"
    )


def test_a_host_back_from_silence_is_decided_again_and_its_regression_is_seen(
    db: sqlite3.Connection, fleet: Writer
) -> None:
    address(db, "ext-only", "eth0", "10.250.1.12/24")
    seen(db, NOW)
    migration.evaluate(db, NOW, POLICY)
    assert states(db)[("ext-only", "公安专网")] == "migrated"
    # Silent for longer than stale_ms: unknown.
    migration.evaluate(db, NOW + 61 * MIN, POLICY)
    assert states(db)[("ext-only", "公安专网")] == "unknown"
    # It reports again, and has talked to the dedicated network meanwhile: regressed, not not_started.
    traffic(db, "ext-only", "公安专网", NOW + 62 * MIN)
    seen(db, NOW + 62 * MIN)
    migration.evaluate(db, NOW + 62 * MIN + 1, POLICY)
    assert states(db)[("ext-only", "公安专网")] == "regressed"


def test_an_unknown_host_reporting_again_without_news_is_decided_again(
    db: sqlite3.Connection, fleet: Writer
) -> None:
    address(db, "ext-only", "eth0", "10.250.1.12/24")
    seen(db, NOW)
    migration.evaluate(db, NOW, POLICY)
    migration.evaluate(db, NOW + 61 * MIN, POLICY)
    assert states(db)[("ext-only", "公安专网")] == "unknown"
    seen(db, NOW + 62 * MIN)  # an ordinary report: no traffic with any zone, no inventory change
    migration.evaluate(db, NOW + 62 * MIN + 1, POLICY)
    assert states(db)[("ext-only", "公安专网")] == "migrated"


def test_a_network_gone_from_the_catalog_is_not_due_again(db: sqlite3.Connection, fleet: Writer) -> None:
    address(db, "only-ded", "eth0", "10.250.2.10/24")
    seen(db, NOW)
    migration.evaluate(db, NOW, POLICY)
    fleet.store_catalog([CATALOG[0], ("公安新专网", *CATALOG[1][1:]), CATALOG[2]], "v2", NOW)
    migration.evaluate(db, NOW + 1000, POLICY, full=True)
    assert migration.evaluate(db, NOW + 2000, POLICY).agents == 0  # the old network's rows are not due
    assert states(db)[("only-ded", "公安新专网")] == "not_started"


def test_zone_ids_reused_after_pruning_are_still_folded(db: sqlite3.Connection, fleet: Writer) -> None:
    seen(db, NOW)
    traffic(db, "ext-only", "市级横向外网", NOW - MIN)
    migration.evaluate(db, NOW, POLICY)
    # Retention deletes every row (all old and rolled up), then lowers the cursors with it.
    from collector.store.retention import Maintenance, RetentionPolicy

    Maintenance(db, RetentionPolicy(raw_hours=1)).run_step(NOW + 2 * 3_600_000, 10_000)
    Maintenance(db, RetentionPolicy(raw_hours=1)).run_step(NOW + 2 * 3_600_000 + 300_000, 10_000)
    assert db.execute("SELECT count(*) FROM zone_traffic").fetchone() == (0,)
    traffic(db, "ext-only", "公安专网", NOW + 2 * 3_600_000)  # gets id 1 again
    seen(db, NOW + 2 * 3_600_000)
    migration.evaluate(db, NOW + 2 * 3_600_000 + 1, POLICY)
    assert states(db)[("ext-only", "公安专网")] == "regressed"
